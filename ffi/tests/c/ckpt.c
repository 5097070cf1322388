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

int main(int argc, char **argv)
{
    g_role = NAME;
    if (argc != 4) {
        fprintf(stderr, "usage: ckpt <dir> <size_kib> <timeout_s>\n");
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
