/* KV handoff through the C ABI (nixl_kv_*).
 *
 *   kv <timeout_s>
 *
 * Two agents in this process, over tcp on 127.0.0.1: a prefill worker (tensor-parallel size 1,
 * layer-first NHD) and a decode worker (rank 1 of 2, block-first HND, so it holds half of the
 * heads in another order). Every element of the prefill cache holds a known value.
 *
 *  1. Layouts: validate (a bad kind, a bad rank are NIXL_ERR_INVALID naming the field), encode
 *     and decode (equal), garbage refused; nixl_kv_descs with no room is
 *     NIXL_ERR_BUFFER_TOO_SMALL with the count, then gives that many descriptors.
 *  2. A pull handoff: prefill offers blocks {5, 2, 7}; decode sees the offer (peer, request,
 *     blocks, lease), pulls into {0, 3, 1}; decode reports NIXL_KV_ENDED/NIXL_KV_DONE, prefill
 *     NIXL_KV_FREED/NIXL_KV_DONE; every byte of the decode cache is checked (the pulled blocks
 *     hold prefill's head 1 of each, everything else is still 0).
 *  3. A plain notification sent meanwhile still reaches nixl_notif_next.
 *  4. Decode declines an offer: prefill reports it freed, cancelled, with decode's reason.
 *  5. Misuse: NULL handles and arrays, a pull of no offer (NIXL_ERR_NOT_FOUND), a small block
 *     array (NIXL_ERR_BUFFER_TOO_SMALL, the event kept), a freed handle.
 *  6. A push handoff: decode reserves blocks {6, 2, 4}; prefill sees NIXL_KV_RESERVED (push
 *     set, decode's blocks), WRITEs its blocks {1, 7, 3} with nixl_kv_push; prefill reports
 *     them freed (done, push set), decode NIXL_KV_ENDED (done, push set); every byte of the
 *     decode cache is checked again. Then a reservation decode cancels before prefill pushes
 *     ends cancelled on decode within the test's time, and pushing it is NIXL_ERR_NOT_FOUND;
 *     while only that KV message is on its way, nixl_notif_wait on prefill's agent is
 *     NIXL_EMPTY (it agrees with nixl_notif_next, which leaves KV messages to the sides).
 * Exit status 0 passed, 1 failed. */
#include "nixl_test.h"

#define LAYERS 2
#define BLOCKS 8
#define TPB 4
#define HEADS 2
#define DIM 8
#define NB 3

static long long tmo_s = 30;

static uint16_t val(uint32_t layer, uint32_t plane, uint32_t block, uint32_t head, uint32_t token,
                    uint32_t e)
{
    return (uint16_t)(layer * 7919u + plane * 10007u + block * 31u + head * 1009u + token * 131u +
                      e * 3u + 1u);
}

/* Offset from base of (layer, plane, block, local head, token), as nixl-kv computes it. */
static uint64_t offset(const nixl_kv_layout *l, uint32_t layer, uint32_t plane, uint32_t block,
                       uint32_t head, uint32_t token)
{
    uint64_t h = l->total_heads / l->tp_size, t = l->tokens_per_block, planes = 2;
    int head_major = l->order == NIXL_KV_LAYER_FIRST_HND || l->order == NIXL_KV_BLOCK_FIRST_HND;
    int block_first = l->order == NIXL_KV_BLOCK_FIRST_NHD || l->order == NIXL_KV_BLOCK_FIRST_HND;
    uint64_t inner = head_major ? head * t + token : token * h + head;
    uint64_t pb = block_first ? ((uint64_t)block * l->layers + layer) * planes + plane
                              : ((uint64_t)layer * planes + plane) * l->blocks + block;
    return (pb * h * t + inner) * (uint64_t)l->head_dim * l->dtype_bytes;
}

static nixl_agent *new_agent(const char *name)
{
    char cfg[1024];
    nt_config(cfg, sizeof cfg, "\"tcp\"", tmo_s * 1000, "%s", "");
    nixl_agent *a = NULL;
    EXPECT_OK(nixl_agent_new(name, cfg, &a));
    nixl_status s = nixl_backend_status(a, "tcp");
    if (s == NIXL_ERR_UNAVAILABLE) {
        printf("[kv] SKIP: tcp cannot run here: %s\n", nixl_last_error());
        exit(EXIT_SKIP);
    }
    EXPECT(s, NIXL_OK);
    return a;
}

static void exchange(nixl_agent *a, nixl_agent *b)
{
    uint8_t *md = NULL;
    size_t len = 0;
    char name[256];
    EXPECT_OK(nixl_local_md(a, &md, &len));
    EXPECT_OK(nixl_load_remote_md(b, md, len, name, sizeof name));
    nixl_bytes_free(md, len);
}

static void expect_error_mentions(const char *what, const char *needle)
{
    const char *e = nixl_last_error();
    CHECK(e != NULL && strstr(e, needle) != NULL, "%s: last error lacks \"%s\"", what, needle);
}

/* Checks decode's memory `dmem` (layout `dl`) after a handoff of prefill's blocks `src` into
 * `dst`: each block of `dst` holds its source block's values, every other block is still zero. */
static void check_landed(const char *what, const uint8_t *dmem, const nixl_kv_layout *dl,
                         const uint32_t *src, const uint32_t *dst)
{
    for (uint32_t L = 0; L < LAYERS; L++)
        for (uint32_t p = 0; p < 2; p++)
            for (uint32_t b = 0; b < BLOCKS; b++)
                for (uint32_t t = 0; t < TPB; t++)
                    for (uint32_t e = 0; e < DIM; e++) {
                        int from = -1;
                        for (int i = 0; i < NB; i++)
                            if (dst[i] == b)
                                from = (int)src[i];
                        uint16_t want = from < 0 ? 0 : val(L, p, (uint32_t)from, 1, t, e), have;
                        memcpy(&have, dmem + offset(dl, L, p, b, 0, t) + 2 * e, 2);
                        CHECK(have == want,
                              "%s: layer %u plane %u block %u token %u elem %u: %u, not %u", what,
                              L, p, b, t, e, have, want);
                    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    g_role = "kv";
    if (argc != 2) {
        fprintf(stderr, "usage: kv <timeout_s>\n");
        return 1;
    }
    tmo_s = atoll(argv[1]);
    CHECK(tmo_s > 0, "timeout");

    nixl_kv_layout pl = {LAYERS, BLOCKS, TPB, HEADS, DIM, 2, NIXL_KV_SPLIT,
                         NIXL_KV_LAYER_FIRST_NHD, 0, 1, 0, 0};
    nixl_kv_layout dl = {LAYERS, BLOCKS, TPB, HEADS, DIM, 2, NIXL_KV_SPLIT,
                         NIXL_KV_BLOCK_FIRST_HND, 1, 2, 0, 0};
    size_t psize = (size_t)LAYERS * 2 * BLOCKS * TPB * HEADS * DIM * 2;
    size_t dsize = psize / 2;
    uint8_t *pmem = calloc(1, psize), *dmem = calloc(1, dsize);
    CHECK(pmem && dmem, "calloc");
    pl.base = (uint64_t)(uintptr_t)pmem;
    dl.base = (uint64_t)(uintptr_t)dmem;
    for (uint32_t L = 0; L < LAYERS; L++)
        for (uint32_t p = 0; p < 2; p++)
            for (uint32_t b = 0; b < BLOCKS; b++)
                for (uint32_t h = 0; h < HEADS; h++)
                    for (uint32_t t = 0; t < TPB; t++)
                        for (uint32_t e = 0; e < DIM; e++) {
                            uint16_t v = val(L, p, b, h, t, e);
                            memcpy(pmem + offset(&pl, L, p, b, h, t) + 2 * e, &v, 2);
                        }

    /* 1. Layouts. */
    EXPECT_OK(nixl_kv_layout_validate(&pl));
    EXPECT_OK(nixl_kv_layout_validate(&dl));
    nixl_kv_layout bad = pl;
    bad.kind = 7;
    EXPECT(nixl_kv_layout_validate(&bad), NIXL_ERR_INVALID);
    expect_error_mentions("bad kind", "kind");
    bad = pl;
    bad.tp_rank = 3;
    EXPECT(nixl_kv_layout_validate(&bad), NIXL_ERR_INVALID);
    expect_error_mentions("bad rank", "tp_rank");
    EXPECT(nixl_kv_layout_validate(NULL), NIXL_ERR_INVALID);
    uint8_t enc[NIXL_KV_LAYOUT_BYTES];
    size_t enc_len = 0;
    EXPECT(nixl_kv_layout_encode(&dl, enc, 3, &enc_len), NIXL_ERR_BUFFER_TOO_SMALL);
    EXPECT_OK(nixl_kv_layout_encode(&dl, enc, sizeof enc, &enc_len));
    CHECK(enc_len == NIXL_KV_LAYOUT_BYTES, "encoded %zu bytes", enc_len);
    nixl_kv_layout back;
    EXPECT_OK(nixl_kv_layout_decode(enc, enc_len, &back));
    CHECK(memcmp(&back, &dl, sizeof dl) == 0, "layout changed in encode/decode");
    enc[0] ^= 0xff;
    EXPECT(nixl_kv_layout_decode(enc, enc_len, &back), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_layout_decode(enc, 5, &back), NIXL_ERR_INVALID);

    uint32_t src[NB] = {5, 2, 7}, dst[NB] = {0, 3, 1};
    size_t count = 0;
    EXPECT(nixl_kv_descs(&pl, 1, &dl, src, dst, NB, 0, NULL, NULL, 0, &count),
           NIXL_ERR_BUFFER_TOO_SMALL);
    CHECK(count > 0, "no descriptors counted");
    nixl_desc *ld = calloc(count, sizeof *ld), *rd = calloc(count, sizeof *rd);
    CHECK(ld && rd, "calloc");
    size_t got = 0;
    EXPECT_OK(nixl_kv_descs(&pl, 1, &dl, src, dst, NB, 0, ld, rd, count, &got));
    CHECK(got == count, "%zu descriptors, then %zu", count, got);
    uint64_t moved = 0;
    for (size_t i = 0; i < got; i++) {
        CHECK(ld[i].addr >= dl.base && ld[i].addr + ld[i].len <= dl.base + dsize, "local %zu", i);
        CHECK(rd[i].addr >= pl.base && rd[i].addr + rd[i].len <= pl.base + psize, "remote %zu", i);
        moved += ld[i].len;
    }
    CHECK(moved == (uint64_t)NB * LAYERS * 2 * TPB * DIM * 2, "descriptors move %llu bytes",
          (unsigned long long)moved);
    EXPECT(nixl_kv_descs(&pl, 1, &dl, src, dst, NB, 1, ld, rd, count, &got), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_descs(&pl, 1, &dl, NULL, dst, NB, 0, ld, rd, count, &got), NIXL_ERR_INVALID);
    free(ld);
    free(rd);

    /* 2. A pull handoff between two agents. */
    nixl_agent *pa = new_agent("kv-prefill"), *da = new_agent("kv-decode");
    nixl_desc pd = {pl.base, psize, 0}, dd = {dl.base, dsize, 0};
    EXPECT_OK(nixl_register(pa, NIXL_DRAM, &pd, 1));
    EXPECT_OK(nixl_register(da, NIXL_DRAM, &dd, 1));
    exchange(pa, da);
    exchange(da, pa);
    nixl_kv_prefill *pre = NULL;
    nixl_kv_decode *dec = NULL;
    EXPECT_OK(nixl_kv_prefill_new(pa, &pre));
    EXPECT_OK(nixl_kv_prefill_set_fence_after(pre, 2000));
    EXPECT_OK(nixl_kv_decode_new(da, &dl, &dec));
    const char *ranks[1] = {"kv-prefill"};
    bad = pl;
    bad.total_heads = 4; /* differs from decode's: refused at handshake */
    EXPECT(nixl_kv_decode_add_prefill(dec, "kv-prefill", &bad, ranks, 1), NIXL_ERR_INVALID);
    EXPECT_OK(nixl_kv_decode_add_prefill(dec, "kv-prefill", &pl, ranks, 1));

    uint64_t id = 0;
    EXPECT(nixl_kv_offer(pre, "kv-decode", "req-1", src, 0, 5000, &id), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_offer(pre, "kv-decode", "req-1", src, NB, 0, &id), NIXL_ERR_INVALID);
    EXPECT_OK(nixl_kv_offer(pre, "kv-decode", "req-1", src, NB, 5000, &id));
    size_t held = 0;
    EXPECT_OK(nixl_kv_prefill_held(pre, &held));
    CHECK(held == 1, "%zu held", held);
    /* 3. A plain notification beside the KV messages. */
    EXPECT_OK(nixl_notif_send(pa, "kv-decode", (const uint8_t *)"hello", 5));

    nixl_kv_event ev;
    uint32_t blocks[16];
    int ended = 0, freed = 0, offered = 0, hello = 0;
    double until = now_s() + tmo_s;
    while (!(ended && freed && hello)) {
        CHECK(now_s() < until, "no end: offered %d ended %d freed %d hello %d", offered, ended,
              freed, hello);
        nixl_status s = nixl_kv_decode_poll(dec, &ev, blocks, 16);
        if (s == NIXL_OK && ev.kind == NIXL_KV_OFFERED) {
            offered = 1;
            CHECK(ev.id == id && strcmp(ev.peer, "kv-prefill") == 0 &&
                      strcmp(ev.request, "req-1") == 0 && ev.lease_ms == 5000 && ev.nblocks == NB &&
                      blocks[0] == 5 && blocks[1] == 2 && blocks[2] == 7,
                  "offer %llu from %s of %s, %u blocks", (unsigned long long)ev.id, ev.peer,
                  ev.request, ev.nblocks);
            EXPECT(nixl_kv_pull(dec, "kv-prefill", id + 100, dst, NB), NIXL_ERR_NOT_FOUND);
            EXPECT_OK(nixl_kv_pull(dec, "kv-prefill", id, dst, NB));
            EXPECT(nixl_kv_pull(dec, "kv-prefill", id, dst, NB), NIXL_ERR_NOT_FOUND);
            EXPECT_OK(nixl_kv_renew(dec, "kv-prefill", id));
        } else if (s == NIXL_OK && ev.kind == NIXL_KV_ENDED) {
            CHECK(ev.outcome == NIXL_KV_DONE, "pull ended %d: %s", ev.outcome, ev.reason);
            CHECK(ev.id == id && strcmp(ev.peer, "kv-prefill") == 0 && ev.nblocks == NB &&
                      blocks[0] == 0 && blocks[1] == 3 && blocks[2] == 1,
                  "ended event");
            ended = 1;
        } else {
            CHECK(s == NIXL_EMPTY, "decode poll: %d", s);
        }
        s = nixl_kv_prefill_poll(pre, &ev, blocks, 16);
        if (s == NIXL_OK) {
            CHECK(ev.kind == NIXL_KV_FREED && ev.outcome == NIXL_KV_DONE && ev.id == id &&
                      strcmp(ev.peer, "kv-decode") == 0 && strcmp(ev.request, "req-1") == 0 &&
                      ev.nblocks == NB && blocks[0] == 5,
                  "freed event kind %d outcome %d (%s)", ev.kind, ev.outcome, ev.reason);
            freed = 1;
        } else {
            CHECK(s == NIXL_EMPTY, "prefill poll: %d", s);
        }
        char from[256];
        uint8_t msg[64];
        size_t mlen = 0;
        s = nixl_notif_next(da, from, sizeof from, msg, sizeof msg, &mlen);
        if (s == NIXL_OK) {
            CHECK(mlen == 5 && memcmp(msg, "hello", 5) == 0 && strcmp(from, "kv-prefill") == 0,
                  "notification of %zu bytes from %s", mlen, from);
            hello = 1;
        } else {
            CHECK(s == NIXL_EMPTY, "nixl_notif_next: %d", s);
        }
        usleep(1000);
    }
    check_landed("pull", dmem, &dl, src, dst);
    EXPECT_OK(nixl_kv_prefill_held(pre, &held));
    CHECK(held == 0, "%zu still held", held);

    /* 4. Decode declines an offer. */
    EXPECT_OK(nixl_kv_offer(pre, "kv-decode", "req-2", src, NB, 5000, &id));
    until = now_s() + tmo_s;
    for (;;) {
        CHECK(now_s() < until, "no offer");
        nixl_status s = nixl_kv_decode_poll(dec, &ev, blocks, 1);
        if (s == NIXL_ERR_BUFFER_TOO_SMALL) {
            /* 5. The event is kept, and says how many blocks it has. */
            CHECK(ev.kind == NIXL_KV_OFFERED && ev.nblocks == NB, "kept event");
            EXPECT_OK(nixl_kv_decode_poll(dec, &ev, blocks, 16));
            CHECK(ev.kind == NIXL_KV_OFFERED && ev.id == id, "offer after a small array");
            break;
        }
        CHECK(s == NIXL_EMPTY, "decode poll: %d", s);
        usleep(1000);
    }
    EXPECT_OK(nixl_kv_decode_cancel(dec, "kv-prefill", id, "no room"));
    until = now_s() + tmo_s;
    for (;;) {
        CHECK(now_s() < until, "declined offer never freed");
        nixl_status s = nixl_kv_prefill_poll(pre, &ev, blocks, 16);
        if (s == NIXL_OK) {
            CHECK(ev.kind == NIXL_KV_FREED && ev.outcome == NIXL_KV_CANCELLED && ev.id == id &&
                      strstr(ev.reason, "no room") != NULL,
                  "declined: kind %d outcome %d reason %s", ev.kind, ev.outcome, ev.reason);
            break;
        }
        CHECK(s == NIXL_EMPTY, "prefill poll: %d", s);
        usleep(1000);
    }
    EXPECT(nixl_kv_prefill_cancel(pre, id, "gone"), NIXL_ERR_NOT_FOUND);

    /* 6. A push handoff into blocks decode reserved. */
    memset(dmem, 0, dsize);
    bad = pl;
    bad.head_dim = 4; /* differs from decode's: refused */
    EXPECT(nixl_kv_prefill_add_decode(pre, "kv-decode", &dl, &bad, 1, 0), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_prefill_add_decode(pre, "kv-decode", &dl, &pl, 1, 1), NIXL_ERR_INVALID);
    EXPECT_OK(nixl_kv_prefill_add_decode(pre, "kv-decode", &dl, &pl, 1, 0));
    uint32_t psrc[NB] = {1, 7, 3}, pdst[NB] = {6, 2, 4};
    uint64_t rid = 0;
    EXPECT(nixl_kv_reserve(dec, "nobody", "req-3", pdst, NB, 5000, &rid), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_reserve(dec, "kv-prefill", "req-3", pdst, NB, 5000, NULL), NIXL_ERR_INVALID);
    EXPECT_OK(nixl_kv_reserve(dec, "kv-prefill", "req-3", pdst, NB, 5000, &rid));
    int reserved = 0, pushed = 0, landed = 0;
    until = now_s() + tmo_s;
    while (!(pushed && landed)) {
        CHECK(now_s() < until, "push: reserved %d pushed %d landed %d", reserved, pushed, landed);
        nixl_status s = nixl_kv_prefill_poll(pre, &ev, blocks, 16);
        if (s == NIXL_OK && ev.kind == NIXL_KV_RESERVED) {
            CHECK(!reserved && ev.push == 1 && ev.id == rid && strcmp(ev.peer, "kv-decode") == 0 &&
                      strcmp(ev.request, "req-3") == 0 && ev.lease_ms == 5000 && ev.nblocks == NB &&
                      blocks[0] == 6 && blocks[1] == 2 && blocks[2] == 4,
                  "reservation %llu from %s of %s, %u blocks, push %u",
                  (unsigned long long)ev.id, ev.peer, ev.request, ev.nblocks, ev.push);
            reserved = 1;
            EXPECT(nixl_kv_push(pre, "kv-decode", rid + 100, psrc, NB), NIXL_ERR_NOT_FOUND);
            EXPECT(nixl_kv_push(pre, "kv-decode", rid, NULL, NB), NIXL_ERR_INVALID);
            EXPECT_OK(nixl_kv_push(pre, "kv-decode", rid, psrc, NB));
            EXPECT(nixl_kv_push(pre, "kv-decode", rid, psrc, NB), NIXL_ERR_NOT_FOUND);
        } else if (s == NIXL_OK) {
            CHECK(reserved && ev.kind == NIXL_KV_FREED && ev.outcome == NIXL_KV_DONE &&
                      ev.push == 1 && ev.id == rid && strcmp(ev.peer, "kv-decode") == 0 &&
                      strcmp(ev.request, "req-3") == 0 && ev.nblocks == NB && blocks[0] == 1 &&
                      blocks[1] == 7 && blocks[2] == 3,
                  "push freed: kind %d outcome %d push %u (%s)", ev.kind, ev.outcome, ev.push,
                  ev.reason);
            pushed = 1;
        } else {
            CHECK(s == NIXL_EMPTY, "prefill poll: %d", s);
        }
        s = nixl_kv_decode_poll(dec, &ev, blocks, 16);
        if (s == NIXL_OK) {
            CHECK(ev.kind == NIXL_KV_ENDED && ev.outcome == NIXL_KV_DONE && ev.push == 1 &&
                      ev.id == rid && strcmp(ev.peer, "kv-prefill") == 0 && ev.nblocks == NB &&
                      blocks[0] == 6 && blocks[1] == 2 && blocks[2] == 4,
                  "push ended: kind %d outcome %d push %u (%s)", ev.kind, ev.outcome, ev.push,
                  ev.reason);
            landed = 1;
        } else {
            CHECK(s == NIXL_EMPTY, "decode poll: %d", s);
        }
        usleep(1000);
    }
    check_landed("push", dmem, &dl, psrc, pdst);
    /* A reservation cancelled before prefill pushes it. Meanwhile only a KV message is on its
     * way to prefill's agent: nixl_notif_wait does not report it ready (nixl_notif_next would
     * not hand it out), and the prefill side still gets it. */
    EXPECT_OK(nixl_kv_reserve(dec, "kv-prefill", "req-4", pdst, NB, 5000, &rid));
    EXPECT(nixl_notif_wait(pa, 1000), NIXL_EMPTY);
    {
        char from[256];
        uint8_t msg[64];
        size_t mlen = 0;
        EXPECT(nixl_notif_next(pa, from, sizeof from, msg, sizeof msg, &mlen), NIXL_EMPTY);
    }
    until = now_s() + tmo_s;
    for (;;) {
        CHECK(now_s() < until, "no reservation");
        nixl_status s = nixl_kv_prefill_poll(pre, &ev, blocks, 16);
        if (s == NIXL_OK) {
            CHECK(ev.kind == NIXL_KV_RESERVED && ev.id == rid, "reservation: kind %d", ev.kind);
            break;
        }
        CHECK(s == NIXL_EMPTY, "prefill poll: %d", s);
        usleep(1000);
    }
    EXPECT_OK(nixl_kv_decode_cancel_reservation(dec, rid, "request aborted"));
    until = now_s() + tmo_s;
    for (;;) {
        CHECK(now_s() < until, "cancelled reservation never ended");
        nixl_status s = nixl_kv_prefill_poll(pre, &ev, blocks, 16);
        CHECK(s == NIXL_EMPTY, "prefill poll after a cancel: %d kind %d", s, ev.kind);
        s = nixl_kv_decode_poll(dec, &ev, blocks, 16);
        if (s == NIXL_OK) {
            CHECK(ev.kind == NIXL_KV_ENDED && ev.outcome == NIXL_KV_CANCELLED && ev.push == 1 &&
                      ev.id == rid && strstr(ev.reason, "request aborted") != NULL,
                  "cancelled reservation: kind %d outcome %d push %u reason %s", ev.kind,
                  ev.outcome, ev.push, ev.reason);
            break;
        }
        CHECK(s == NIXL_EMPTY, "decode poll: %d", s);
        usleep(1000);
    }
    EXPECT(nixl_kv_push(pre, "kv-decode", rid, psrc, NB), NIXL_ERR_NOT_FOUND);

    /* 5. Misuse. */
    EXPECT(nixl_kv_prefill_poll(NULL, &ev, blocks, 16), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_prefill_set_fence_after(NULL, 100), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_decode_poll(dec, NULL, blocks, 16), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_decode_poll(dec, &ev, NULL, 4), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_offer(pre, NULL, "r", src, NB, 10, &id), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_offer(pre, "kv-decode", "r", src, NB, 10, NULL), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_push(NULL, "kv-decode", 1, src, NB), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_reserve(dec, "kv-prefill", "r", NULL, NB, 10, &id), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_decode_cancel_reservation(NULL, 1, NULL), NIXL_ERR_INVALID);
    EXPECT(nixl_kv_decode_poll((nixl_kv_decode *)pre, &ev, blocks, 16), NIXL_ERR_INVALID);
    expect_error_mentions("wrong handle", "nixl_kv_decode");
    nixl_kv_prefill_free(pre);
    EXPECT(nixl_kv_prefill_poll(pre, &ev, blocks, 16), NIXL_ERR_INVALID);
    nixl_kv_prefill_free(pre); /* a second free is refused, not a crash */
    nixl_kv_decode_free(dec);
    nixl_kv_decode_free(NULL);

    nixl_agent_free(pa);
    nixl_agent_free(da);
    free(pmem);
    free(dmem);
    printf("[kv] OK\n");
    return 0;
}
