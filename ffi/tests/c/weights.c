/* Weight streaming through the C ABI (nixl_weights_*), as an engine's loader uses it.
 *
 *   weights <source HOST:PORT> <secret> <timeout_s>
 *
 * The harness (c_api.rs) serves model "tiny": the tensors of TENSORS below in two safetensors
 * files, tensor k holding pattern k + 1 (nixl_test.h's pat).
 *  1. Opening: NULL and missing arguments, an unknown model and a dead address fail with their
 *     status and leave *out alone; then the model opens and names itself.
 *  2. Listing: the count, every name once, each one's dtype, shape and size.
 *  3. Pulling: every tensor into malloc'd memory registered with the agent (one byte larger,
 *     which must stay untouched), every byte checked; then four threads at once on one handle.
 *  4. Errors, each with its exact status, a last error naming what matters, and the buffer
 *     untouched: unknown tensor, wrong dtype, wrong shape, too-small buffer, unregistered
 *     memory, a FILE kind, NULL and foreign handles, a too-small shape or dtype output.
 * Exit status 0 passed, 1 failed. */
#include "nixl_test.h"

#include <pthread.h>

#define NT 6

static const struct {
    const char *name;
    const char *dtype;
    size_t ndim;
    uint64_t shape[3];
    uint64_t len;
} TENSORS[NT] = {
    {"embed.weight", "F32", 2, {33, 17, 0}, 33 * 17 * 4},
    {"layers.0.attn.q", "BF16", 2, {64, 48, 0}, 64 * 48 * 2},
    {"layers.0.norm", "F16", 1, {48, 0, 0}, 48 * 2},
    {"layers.1.mlp.up", "I8", 3, {7, 3, 4099}, 7 * 3 * 4099},
    {"lm_head.scale", "F64", 0, {0, 0, 0}, 8},
    {"lm_head.weight", "U8", 1, {100003, 0, 0}, 100003},
};

static void expect_error_mentions(const char *what, const char *needle)
{
    const char *e = nixl_last_error();
    CHECK(e != NULL && strstr(e, needle) != NULL, "%s: last error lacks \"%s\"", what, needle);
}

static int index_of(const char *name)
{
    for (int k = 0; k < NT; k++)
        if (strcmp(TENSORS[k].name, name) == 0)
            return k;
    return -1;
}

/* buf[0 .. len) is still `byte` everywhere. */
static void expect_untouched(const uint8_t *buf, uint64_t len, uint8_t byte, const char *what)
{
    for (uint64_t i = 0; i < len; i++)
        CHECK(buf[i] == byte, "%s: byte %llu was written", what, (unsigned long long)i);
}

/* One thread's pull: tensor k into its own registered buffer, checked. */
typedef struct {
    nixl_weights *w;
    int k;
    const uint8_t *buf;
    nixl_status got;
} pull_job;

static void *pull_thread(void *arg)
{
    pull_job *j = arg;
    j->got = nixl_weights_pull_tensor(j->w, TENSORS[j->k].name, TENSORS[j->k].dtype,
                                      TENSORS[j->k].shape, TENSORS[j->k].ndim, NIXL_DRAM,
                                      (uint64_t)(uintptr_t)j->buf, TENSORS[j->k].len, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    g_role = "weights";
    if (argc != 4) {
        fprintf(stderr, "usage: weights <source HOST:PORT> <secret> <timeout_s>\n");
        return 1;
    }
    const char *source = argv[1];
    long long tmo = atoll(argv[3]) * 1000;
    char cfg[1024];
    nt_config(cfg, sizeof cfg, "\"tcp\"", tmo, "[auth]\nsecret = \"%s\"\n", argv[2]);
    nixl_agent *a = NULL;
    EXPECT_OK(nixl_agent_new("loader", cfg, &a));

    /* 1. Opening. */
    nixl_weights *const SENTINEL = (nixl_weights *)(uintptr_t)0x5e47;
    nixl_weights *w = SENTINEL;
    EXPECT(nixl_weights_open(NULL, "tiny", source, NULL, tmo, &w), NIXL_ERR_INVALID);
    EXPECT(nixl_weights_open(a, NULL, source, NULL, tmo, &w), NIXL_ERR_INVALID);
    EXPECT(nixl_weights_open(a, "tiny", NULL, NULL, tmo, &w), NIXL_ERR_INVALID);
    expect_error_mentions("no sources", "no sources");
    EXPECT(nixl_weights_open(a, "tiny", " , ", NULL, tmo, &w), NIXL_ERR_INVALID);
    EXPECT(nixl_weights_open(a, "tiny", source, NULL, -1, &w), NIXL_ERR_INVALID);
    EXPECT(nixl_weights_open(a, "tiny", source, NULL, tmo, NULL), NIXL_ERR_INVALID);
    EXPECT(nixl_weights_open(a, "other-model", source, NULL, tmo, &w), NIXL_ERR_NOT_FOUND);
    expect_error_mentions("unknown model", "other-model");
    EXPECT(nixl_weights_open(a, "tiny", "127.0.0.1:1", NULL, tmo, &w), NIXL_ERR_NOT_FOUND);
    expect_error_mentions("dead source", "127.0.0.1:1");
    CHECK(w == SENTINEL, "a failed nixl_weights_open wrote *out");
    /* A dead address beside a live one is skipped. */
    char both[512];
    snprintf(both, sizeof both, "127.0.0.1:1, %s", source);
    EXPECT_OK(nixl_weights_open(a, "tiny", both, NULL, tmo, &w));
    CHECK(w != SENTINEL && w != NULL, "no handle");

    char id[256] = "unchanged";
    EXPECT(nixl_weights_model_id(w, id, 5), NIXL_ERR_BUFFER_TOO_SMALL);
    CHECK(strcmp(id, "unchanged") == 0, "a failed nixl_weights_model_id wrote its output");
    EXPECT_OK(nixl_weights_model_id(w, id, sizeof id));
    CHECK(strncmp(id, "tiny@", 5) == 0 && strlen(id) == 5 + 16, "model id \"%s\"", id);

    /* 2. Listing. */
    size_t count = 0;
    EXPECT_OK(nixl_weights_tensor_count(w, &count));
    CHECK(count == NT, "%zu tensors, expected %d", count, NT);
    int seen[NT] = {0};
    for (size_t i = 0; i < count; i++) {
        char name[128];
        EXPECT_OK(nixl_weights_tensor_name(w, i, name, sizeof name));
        int k = index_of(name);
        CHECK(k >= 0 && !seen[k], "tensor %zu is \"%s\" (unknown or listed twice)", i, name);
        seen[k] = 1;
        char dtype[16];
        uint64_t shape[NIXL_WEIGHTS_MAX_DIMS];
        size_t ndim = 99;
        uint64_t len = 0;
        EXPECT_OK(nixl_weights_tensor_info(w, name, dtype, sizeof dtype, shape,
                                           NIXL_WEIGHTS_MAX_DIMS, &ndim, &len));
        CHECK(strcmp(dtype, TENSORS[k].dtype) == 0, "%s: dtype %s", name, dtype);
        CHECK(ndim == TENSORS[k].ndim, "%s: %zu dimensions", name, ndim);
        for (size_t d = 0; d < ndim; d++)
            CHECK(shape[d] == TENSORS[k].shape[d], "%s: dimension %zu is %llu", name, d,
                  (unsigned long long)shape[d]);
        CHECK(len == TENSORS[k].len, "%s: %llu bytes", name, (unsigned long long)len);
    }
    EXPECT(nixl_weights_tensor_name(w, count, (char[8]){0}, 8), NIXL_ERR_INVALID);
    char small[2] = "x";
    EXPECT(nixl_weights_tensor_name(w, 0, small, sizeof small), NIXL_ERR_BUFFER_TOO_SMALL);
    CHECK(small[0] == 'x', "a failed nixl_weights_tensor_name wrote its output");
    {
        char dtype[16] = "same";
        uint64_t shape[2] = {7, 7};
        size_t ndim = 7;
        uint64_t len = 7;
        EXPECT(nixl_weights_tensor_info(w, "layers.1.mlp.up", dtype, sizeof dtype, shape, 2,
                                        &ndim, &len),
               NIXL_ERR_BUFFER_TOO_SMALL);
        expect_error_mentions("shape_cap", "3 dimensions");
        EXPECT(nixl_weights_tensor_info(w, "layers.0.norm", dtype, 3, shape, 2, &ndim, &len),
               NIXL_ERR_BUFFER_TOO_SMALL);
        EXPECT(nixl_weights_tensor_info(w, "no.such", dtype, sizeof dtype, shape, 2, &ndim, &len),
               NIXL_ERR_NOT_FOUND);
        expect_error_mentions("unknown name", "no.such");
        EXPECT(nixl_weights_tensor_info(w, "layers.0.norm", dtype, sizeof dtype, shape, 2, NULL,
                                        &len),
               NIXL_ERR_INVALID);
        CHECK(strcmp(dtype, "same") == 0 && shape[0] == 7 && ndim == 7 && len == 7,
              "a failed nixl_weights_tensor_info wrote an output");
        /* A scalar needs no shape array. */
        EXPECT_OK(nixl_weights_tensor_info(w, "lm_head.scale", dtype, sizeof dtype, NULL, 0, &ndim,
                                           &len));
        CHECK(ndim == 0 && len == 8, "scalar: %zu dimensions, %llu bytes", ndim,
              (unsigned long long)len);
    }

    /* 3. Every tensor into registered memory, one byte larger than the tensor. */
    for (int k = 0; k < NT; k++) {
        uint64_t len = TENSORS[k].len;
        uint8_t *buf = xmalloc(len + 1);
        memset(buf, 0xee, len + 1);
        nixl_desc d = {(uint64_t)(uintptr_t)buf, len + 1, 0};
        EXPECT_OK(nixl_register(a, NIXL_DRAM, &d, 1));
        EXPECT_OK(nixl_weights_pull_tensor(w, TENSORS[k].name, TENSORS[k].dtype, TENSORS[k].shape,
                                           TENSORS[k].ndim, NIXL_DRAM, d.addr, len + 1, 0));
        VERIFY(buf, 0, len, (uint32_t)k + 1, 0, TENSORS[k].name);
        CHECK(buf[len] == 0xee, "%s: the byte past the tensor was written", TENSORS[k].name);
        EXPECT_OK(nixl_deregister(a, NIXL_DRAM, &d, 1));
        free(buf);
    }

    /* Several threads through one handle at once, each tensor twice. */
    {
        enum { NJ = 4 };
        pthread_t th[NJ];
        pull_job jobs[NJ];
        nixl_desc ds[NJ];
        for (int i = 0; i < NJ; i++) {
            int k = (i % 2) ? 3 : 5;
            uint8_t *b = xmalloc(TENSORS[k].len);
            memset(b, 0, TENSORS[k].len);
            ds[i] = (nixl_desc){(uint64_t)(uintptr_t)b, TENSORS[k].len, 0};
            EXPECT_OK(nixl_register(a, NIXL_DRAM, &ds[i], 1));
            jobs[i] = (pull_job){w, k, b, NIXL_ERR_PANIC};
        }
        for (int i = 0; i < NJ; i++)
            CHECK(pthread_create(&th[i], NULL, pull_thread, &jobs[i]) == 0, "pthread_create");
        for (int i = 0; i < NJ; i++) {
            CHECK(pthread_join(th[i], NULL) == 0, "pthread_join");
            CHECK(jobs[i].got == NIXL_OK, "thread %d: %s", i, status_name(jobs[i].got));
            VERIFY(jobs[i].buf, 0, TENSORS[jobs[i].k].len, (uint32_t)jobs[i].k + 1, 0,
                   TENSORS[jobs[i].k].name);
            EXPECT_OK(nixl_deregister(a, NIXL_DRAM, &ds[i], 1));
            free((void *)jobs[i].buf);
        }
    }

    /* 4. Errors, against the largest tensor's exact-size registered buffer. */
    const int K = 5;
    uint64_t len = TENSORS[K].len;
    uint8_t *buf = xmalloc(len);
    memset(buf, 0xee, len);
    nixl_desc d = {(uint64_t)(uintptr_t)buf, len, 0};
    EXPECT_OK(nixl_register(a, NIXL_DRAM, &d, 1));
    const char *nm = TENSORS[K].name;
    const uint64_t *shape = TENSORS[K].shape;
    EXPECT(nixl_weights_pull_tensor(w, "no.such.tensor", "U8", shape, 1, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_NOT_FOUND);
    expect_error_mentions("unknown tensor", "no.such.tensor");
    EXPECT(nixl_weights_pull_tensor(w, nm, "I8", shape, 1, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_INVALID);
    expect_error_mentions("wrong dtype", "the caller expects I8");
    uint64_t wrong[2] = {100003, 1};
    EXPECT(nixl_weights_pull_tensor(w, nm, "U8", wrong, 2, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_INVALID);
    expect_error_mentions("wrong rank", nm);
    wrong[0] = 100002;
    EXPECT(nixl_weights_pull_tensor(w, nm, "U8", wrong, 1, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_INVALID);
    expect_error_mentions("wrong shape", "[100002]");
    EXPECT(nixl_weights_pull_tensor(w, nm, "U8", NULL, 1, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_INVALID);
    EXPECT(nixl_weights_pull_tensor(w, nm, "U8", shape, 1, NIXL_DRAM, d.addr, len - 1, 0),
           NIXL_ERR_BUFFER_TOO_SMALL);
    expect_error_mentions("too small", "100003 bytes");
    EXPECT(nixl_weights_pull_tensor(w, nm, "U8", shape, 1, NIXL_FILE, d.addr, len, 0),
           NIXL_ERR_INVALID);
    EXPECT(nixl_weights_pull_tensor(w, nm, NULL, shape, 1, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_INVALID);
    EXPECT(nixl_weights_pull_tensor(NULL, nm, "U8", shape, 1, NIXL_DRAM, d.addr, len, 0),
           NIXL_ERR_INVALID);
    EXPECT(nixl_weights_pull_tensor((nixl_weights *)(void *)a, nm, "U8", shape, 1, NIXL_DRAM,
                                    d.addr, len, 0),
           NIXL_ERR_INVALID);
    expect_error_mentions("foreign handle", "not a live nixl_weights");
    expect_untouched(buf, len, 0xee, "after the refused pulls");
    uint8_t *loose = xmalloc(len);
    memset(loose, 0xee, len);
    EXPECT(nixl_weights_pull_tensor(w, nm, "U8", shape, 1, NIXL_DRAM, (uint64_t)(uintptr_t)loose,
                                    len, 0),
           NIXL_ERR_INVALID);
    expect_error_mentions("unregistered", "not inside a registered region");
    expect_untouched(loose, len, 0xee, "unregistered memory");
    free(loose);
    /* The registered buffer still takes the tensor. */
    EXPECT_OK(nixl_weights_pull_tensor(w, nm, "U8", shape, 1, NIXL_DRAM, d.addr, len, 0));
    VERIFY(buf, 0, len, (uint32_t)K + 1, 0, nm);
    EXPECT_OK(nixl_deregister(a, NIXL_DRAM, &d, 1));
    free(buf);

    /* The handle keeps the agent alive; a closed handle is refused, a second close ignored. */
    nixl_agent_free(a);
    EXPECT_OK(nixl_weights_tensor_count(w, &count));
    nixl_weights_close(w);
    EXPECT(nixl_weights_tensor_count(w, &count), NIXL_ERR_INVALID);
    nixl_weights_close(w);
    nixl_weights_close(NULL);
    printf("weights: ok\n");
    return 0;
}
