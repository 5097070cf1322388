/* Checkpoints through the C ABI (nixl_ckpt_save / nixl_ckpt_restore).
 *
 *   ckpt <dir> <size_kib> <timeout_s>
 *
 *  1. Three registered regions of odd sizes (one of them 3 bytes) are saved to <dir>/full and
 *     restored into three other registered buffers, every byte checked.
 *  2. One byte changes; an incremental save over <dir>/full restores on its own.
 *  3. Errors, each with its exact status and a last error that names what matters: a name the
 *     checkpoint lacks (NIXL_ERR_NOT_FOUND), a length that differs, a byte flipped in a data
 *     file (NIXL_ERR_INVALID naming region, chunk, and that memory was partly written), no
 *     checkpoint, NULL arguments, memory outside every registration.
 *  4. Artifact directories (nixl_ckpt_save_artifacts, nixl_ckpt_restore_artifact): a nested
 *     tree with an empty file saved with the regions and restored into a new directory, every
 *     byte compared; a taken destination, an unknown name and a damaged file refused, leaving
 *     the destination absent.
 *
 *   ckpt <dir> <size_kib> <timeout_s> <s3_endpoint> <bucket>
 *
 *  5. Artifact directories under s3://<bucket>/c-art (an S3 server at <s3_endpoint>, moto in
 *     the tests): saved through an agent with the object backend, restored by
 *     nixl_ckpt_restore_artifact (a private agent configured from AWS_*) and by
 *     nixl_ckpt_restore_artifact_with (the caller's agent), every byte compared; an unknown
 *     name and a prefix holding no checkpoint refused.
 * Exit status 0 passed, 1 failed. */
#include "nixl_test.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>

#define NAME "ckpt"
#define NREG 3

static nixl_desc dram(const void *p, uint64_t len)
{
    nixl_desc d = {(uint64_t)(uintptr_t)p, len, 0};
    return d;
}

static void expect_error_mentions(const char *what, const char *needle)
{
    const char *e = nixl_last_error();
    CHECK(e != NULL && strstr(e, needle) != NULL, "%s: last error lacks \"%s\"", what, needle);
}

/* The largest data file of the checkpoint at `dir` (the one of the largest region). */
static void largest_data_file(const char *dir, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    CHECK(d != NULL, "opendir %s: %s", dir, strerror(errno));
    off_t best = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (e->d_name[0] != 'd' || n < 4 || strcmp(e->d_name + n - 4, ".dat") != 0)
            continue;
        char path[8192];
        CHECK(strlen(dir) + n + 2 <= sizeof path, "path too long");
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        CHECK(stat(path, &st) == 0, "stat %s", path);
        if (st.st_size > best) {
            best = st.st_size;
            CHECK(strlen(path) < cap, "path too long");
            memcpy(out, path, strlen(path) + 1);
        }
    }
    closedir(d);
    CHECK(best > 0, "no data file in %s", dir);
}

static void write_file(const char *path, const void *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    CHECK(fd >= 0, "create %s: %s", path, strerror(errno));
    CHECK(n == 0 || write(fd, p, n) == (ssize_t)n, "write %s", path);
    close(fd);
}

/* Reads up to `cap` bytes of `path`; returns how many there were (cap + 1 if more). */
static size_t read_file(const char *path, void *p, size_t cap)
{
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, (uint8_t *)p + got, cap - got);
        CHECK(n >= 0, "read %s", path);
        if (n == 0)
            break;
        got += (size_t)n;
        if (got == cap) {
            uint8_t extra;
            if (read(fd, &extra, 1) == 1)
                got = cap + 1;
            break;
        }
    }
    close(fd);
    return got;
}

/* Compares the tree restored at `out` with the one s3_artifacts saved. */
static void check_tree(const char *out, const uint8_t *want, size_t n)
{
    char got[8192];
    uint8_t *back = xmalloc(n + 1);
    snprintf(got, sizeof got, "%s/sub/kernel.bin", out);
    CHECK(read_file(got, back, n) == n && memcmp(back, want, n) == 0, "restored %s differs", got);
    snprintf(got, sizeof got, "%s/empty", out);
    CHECK(read_file(got, back, n) == 0, "%s is not empty", got);
    free(back);
}

/* Part 5: artifact directories under s3://. */
static int s3_artifacts(const char *dir, const char *endpoint, const char *bucket)
{
    CHECK(setenv("AWS_ENDPOINT_URL", endpoint, 1) == 0 && setenv("AWS_REGION", "us-east-1", 1) == 0 &&
              setenv("AWS_ACCESS_KEY_ID", "testing", 1) == 0 &&
              setenv("AWS_SECRET_ACCESS_KEY", "testing", 1) == 0,
          "setenv");
    nixl_agent *b = NULL;
    EXPECT_OK(nixl_agent_new(NAME "-s3", "backends = [\"uring\", \"posix\", \"object\"]", &b));
    size_t rlen = 100003, alen = (1 << 20) + 77;
    uint8_t *reg = xmalloc(rlen), *data = xmalloc(alen);
    fill(reg, rlen, 9);
    fill(data, alen, 10);
    nixl_desc d = dram(reg, rlen);
    EXPECT_OK(nixl_register(b, NIXL_DRAM, &d, 1));
    nixl_ckpt_region r = {"r", NIXL_DRAM, (uint64_t)(uintptr_t)reg, rlen, 0};
    char tree[2048], sub[4096], f[8192], uri[4096], none[4096], out[4096];
    snprintf(tree, sizeof tree, "%s/s3tree", dir);
    snprintf(sub, sizeof sub, "%s/sub", tree);
    CHECK(mkdir(tree, 0755) == 0 && mkdir(sub, 0750) == 0, "mkdir: %s", strerror(errno));
    snprintf(f, sizeof f, "%s/kernel.bin", sub);
    write_file(f, data, alen);
    snprintf(f, sizeof f, "%s/empty", tree);
    write_file(f, data, 0);
    snprintf(uri, sizeof uri, "s3://%s/c-art", bucket);
    snprintf(none, sizeof none, "s3://%s/c-none", bucket);
    const char *anames[1] = {"triton"};
    const char *adirs[1] = {tree};
    EXPECT_OK(nixl_ckpt_save_artifacts(b, uri, &r, 1, NULL, anames, adirs, 1));
    /* A private agent configured from the environment. */
    snprintf(out, sizeof out, "%s/s3out1", dir);
    EXPECT_OK(nixl_ckpt_restore_artifact(uri, "triton", out));
    check_tree(out, data, alen);
    /* The caller's agent. */
    snprintf(out, sizeof out, "%s/s3out2", dir);
    EXPECT_OK(nixl_ckpt_restore_artifact_with(b, uri, "triton", out));
    check_tree(out, data, alen);
    snprintf(out, sizeof out, "%s/s3out3", dir);
    EXPECT(nixl_ckpt_restore_artifact(uri, "nope", out), NIXL_ERR_NOT_FOUND);
    EXPECT(nixl_ckpt_restore_artifact(none, "triton", out), NIXL_ERR_INVALID);
    expect_error_mentions("no checkpoint", "no checkpoint");
    EXPECT(nixl_ckpt_restore_artifact_with(NULL, uri, "triton", out), NIXL_ERR_INVALID);
    struct stat st;
    CHECK(stat(out, &st) != 0, "%s exists after failed restores", out);
    EXPECT_OK(nixl_deregister(b, NIXL_DRAM, &d, 1));
    nixl_agent_free(b);
    free(reg);
    free(data);
    printf("ckpt s3: ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    g_role = NAME;
    if (argc == 6)
        return s3_artifacts(argv[1], argv[4], argv[5]);
    if (argc != 4) {
        fprintf(stderr, "usage: ckpt <dir> <size_kib> <timeout_s> [<s3_endpoint> <bucket>]\n");
        return 1;
    }
    const char *dir = argv[1];
    uint64_t big = (uint64_t)atoll(argv[2]) * 1024 + 13;
    uint64_t lens[NREG] = {big, big / 3 + 4097, 3};
    const char *names[NREG] = {"weights", "kv", "tiny"};
    char full[4096], inc[4096];
    snprintf(full, sizeof full, "%s/full", dir);
    snprintf(inc, sizeof inc, "%s/inc", dir);

    nixl_agent *a = NULL;
    EXPECT_OK(nixl_agent_new(NAME, "backends = [\"uring\", \"posix\"]", &a));
    uint8_t *src[NREG], *dst[NREG];
    nixl_ckpt_region s[NREG], r[NREG];
    for (int i = 0; i < NREG; i++) {
        src[i] = xmalloc(lens[i]);
        dst[i] = xmalloc(lens[i]);
        fill(src[i], lens[i], (uint32_t)i + 1);
        memset(dst[i], 0, lens[i]);
        nixl_desc ds[2] = {dram(src[i], lens[i]), dram(dst[i], lens[i])};
        EXPECT_OK(nixl_register(a, NIXL_DRAM, ds, 2));
        nixl_ckpt_region x = {names[i], NIXL_DRAM, (uint64_t)(uintptr_t)src[i], lens[i], 0};
        s[i] = x;
        x.addr = (uint64_t)(uintptr_t)dst[i];
        r[i] = x;
    }

    /* 1. Full save and restore. */
    EXPECT_OK(nixl_ckpt_save(a, full, s, NREG, NULL));
    EXPECT_OK(nixl_ckpt_restore(a, full, r, NREG));
    for (int i = 0; i < NREG; i++)
        VERIFY(dst[i], 0, lens[i], (uint32_t)i + 1, 0, names[i]);

    /* 2. Incremental over it. */
    src[0][lens[0] / 2] ^= 0xff;
    EXPECT_OK(nixl_ckpt_save(a, inc, s, NREG, full));
    memset(dst[0], 0, lens[0]);
    EXPECT_OK(nixl_ckpt_restore(a, inc, r, 1));
    CHECK(memcmp(dst[0], src[0], lens[0]) == 0, "incremental restore differs");

    /* 3. Errors. */
    nixl_ckpt_region bad = r[2];
    bad.name = "missing";
    EXPECT(nixl_ckpt_restore(a, full, &bad, 1), NIXL_ERR_NOT_FOUND);
    expect_error_mentions("missing name", "\"missing\"");
    bad = r[1];
    bad.len -= 1;
    EXPECT(nixl_ckpt_restore(a, full, &bad, 1), NIXL_ERR_INVALID);
    expect_error_mentions("length", "\"kv\"");
    EXPECT(nixl_ckpt_restore(a, dir, r, NREG), NIXL_ERR_INVALID);
    expect_error_mentions("no checkpoint", "no checkpoint");
    EXPECT(nixl_ckpt_restore(a, NULL, r, NREG), NIXL_ERR_INVALID);
    EXPECT(nixl_ckpt_restore(a, full, NULL, 1), NIXL_ERR_INVALID);
    EXPECT(nixl_ckpt_save(NULL, full, s, NREG, NULL), NIXL_ERR_INVALID);
    EXPECT(nixl_ckpt_save(a, full, s, 0, NULL), NIXL_ERR_INVALID);
    bad = s[0];
    bad.name = NULL;
    EXPECT(nixl_ckpt_save(a, full, &bad, 1, NULL), NIXL_ERR_INVALID);
    uint8_t loose[64];
    memset(loose, 0, sizeof loose);
    nixl_ckpt_region l = {"x", NIXL_DRAM, (uint64_t)(uintptr_t)loose, sizeof loose, 0};
    EXPECT(nixl_ckpt_save(a, full, &l, 1, NULL), NIXL_ERR_INVALID);
    expect_error_mentions("unregistered", "not inside a registration");

    char data[8192];
    largest_data_file(full, data, sizeof data);
    int fd = open(data, O_RDWR);
    CHECK(fd >= 0, "open %s: %s", data, strerror(errno));
    uint8_t byte;
    CHECK(pread(fd, &byte, 1, 5) == 1, "pread");
    byte ^= 0x20;
    CHECK(pwrite(fd, &byte, 1, 5) == 1, "pwrite");
    close(fd);
    EXPECT(nixl_ckpt_restore(a, full, r, NREG), NIXL_ERR_INVALID);
    expect_error_mentions("flipped byte", "\"weights\" chunk 0");
    expect_error_mentions("flipped byte", "partly written");

    /* 4. Artifact directories. */
    char tree[4096], sub[4200], f1[4400], f2[4400], art[4096], out[4096], got[4400];
    snprintf(tree, sizeof tree, "%s/tree", dir);
    snprintf(sub, sizeof sub, "%s/sub dir", tree);
    snprintf(f1, sizeof f1, "%s/kernel.bin", sub);
    snprintf(f2, sizeof f2, "%s/empty", tree);
    snprintf(art, sizeof art, "%s/art", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    CHECK(mkdir(tree, 0755) == 0 && mkdir(sub, 0750) == 0, "mkdir: %s", strerror(errno));
    size_t alen = lens[1] - 5;
    write_file(f1, src[1], alen);
    write_file(f2, src[1], 0);
    const char *anames[1] = {"triton"};
    const char *adirs[1] = {tree};
    EXPECT_OK(nixl_ckpt_save_artifacts(a, art, s, NREG, NULL, anames, adirs, 1));
    EXPECT_OK(nixl_ckpt_restore_artifact(art, "triton", out));
    snprintf(got, sizeof got, "%s/sub dir/kernel.bin", out);
    uint8_t *back = xmalloc(lens[1]);
    CHECK(read_file(got, back, lens[1]) == alen && memcmp(back, src[1], alen) == 0,
          "restored %s differs", got);
    snprintf(got, sizeof got, "%s/empty", out);
    CHECK(read_file(got, back, lens[1]) == 0, "%s is not empty", got);
    EXPECT(nixl_ckpt_restore_artifact(art, "triton", out), NIXL_ERR_INVALID);
    expect_error_mentions("taken destination", "not empty");
    snprintf(got, sizeof got, "%s/out2", dir);
    EXPECT(nixl_ckpt_restore_artifact(art, "nope", got), NIXL_ERR_NOT_FOUND);
    EXPECT(nixl_ckpt_restore_artifact(NULL, "triton", got), NIXL_ERR_INVALID);
    EXPECT(nixl_ckpt_save_artifacts(a, art, s, NREG, NULL, NULL, adirs, 1), NIXL_ERR_INVALID);
    /* A byte of the artifact's data flipped: refused, nothing at the destination. */
    /* The artifact's data file is the one of alen bytes (the regions' have other sizes). */
    DIR *dd = opendir(art);
    CHECK(dd != NULL, "opendir %s", art);
    struct dirent *de;
    int flipped = 0;
    while ((de = readdir(dd)) != NULL) {
        char p[8192];
        snprintf(p, sizeof p, "%s/%s", art, de->d_name);
        struct stat st;
        if (de->d_name[0] != 'd' || stat(p, &st) != 0 || (uint64_t)st.st_size != alen)
            continue;
        int afd = open(p, O_RDWR);
        CHECK(afd >= 0, "open %s", p);
        uint8_t b;
        CHECK(pread(afd, &b, 1, 7) == 1, "pread");
        b ^= 1;
        CHECK(pwrite(afd, &b, 1, 7) == 1, "pwrite");
        close(afd);
        flipped = 1;
    }
    closedir(dd);
    CHECK(flipped, "no artifact data file of %zu bytes in %s", alen, art);
    EXPECT(nixl_ckpt_restore_artifact(art, "triton", got), NIXL_ERR_INVALID);
    expect_error_mentions("damaged artifact", "kernel.bin");
    struct stat gst;
    CHECK(stat(got, &gst) != 0, "%s exists after a failed restore", got);
    free(back);

    for (int i = 0; i < NREG; i++) {
        nixl_desc ds[2] = {dram(src[i], lens[i]), dram(dst[i], lens[i])};
        EXPECT_OK(nixl_deregister(a, NIXL_DRAM, ds, 2));
        free(src[i]);
        free(dst[i]);
    }
    nixl_agent_free(a);
    printf("ckpt: ok\n");
    return 0;
}
