/*
 * The error paths of the C ABI: NULL pointers, invalid UTF-8, unknown keys, taken names,
 * wrong kinds, bad descriptors and flags, use after close; and one handle used from several
 * threads at once.
 *
 * Usage: errors WORKDIR BACKEND   (WORKDIR exists and is empty)
 */
#define _GNU_SOURCE
#include <pthread.h>

#include "common.h"

struct worker {
    strata_store *store;
    int n;
    int failures;
};

/* Builds a chain of 10 snapshots of its own on the shared handle. */
static void *build_chain(void *arg) {
    struct worker *w = arg;
    char parent[64] = {0}, key[64], name[64];
    for (int i = 0; i < 10; i++) {
        snprintf(key, sizeof key, "t%d-active-%d", w->n, i);
        snprintf(name, sizeof name, "t%d-layer-%d", w->n, i);
        if (strata_prepare(w->store, key, i ? parent : NULL, NULL, 0, NULL) != STRATA_OK ||
            strata_commit(w->store, name, key, NULL, 0) != STRATA_OK) {
            fprintf(stderr, "thread %d: %s\n", w->n, strata_last_error());
            w->failures++;
            return NULL;
        }
        snprintf(parent, sizeof parent, "%s", name);
    }
    return NULL;
}

static int count(const strata_info *info, void *user) {
    (void)info;
    ++*(int *)user;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: errors WORKDIR BACKEND\n");
        return 2;
    }
    char *root = NULL;
    ASSERT(asprintf(&root, "%s/store", argv[1]) > 0);
    const char *backend = argv[2];
    strata_store *s = NULL;

    /* Opening. */
    EXPECT_FAIL(strata_open(NULL, backend, NULL, &s), STRATA_E_INVALID_ARGUMENT, "root");
    EXPECT_FAIL(strata_open(root, backend, NULL, NULL), STRATA_E_INVALID_ARGUMENT, "out");
    EXPECT_FAIL(strata_open(root, "zfs", NULL, &s), STRATA_E_INVALID_ARGUMENT, "zfs");
    strata_open_options bad = {.flags = 0x80};
    EXPECT_FAIL(strata_open(root, backend, &bad, &s), STRATA_E_INVALID_ARGUMENT, "flags");
    ASSERT(s == NULL);
    CHECK(strata_open(root, backend, NULL, &s));
    strata_store *other = NULL;
    const char *wrong = strcmp(backend, "native") == 0 ? "overlay" : "native";
    EXPECT_FAIL(strata_open(root, wrong, NULL, &other), STRATA_E_INVALID_ARGUMENT, backend);

    /* Keys. */
    strata_info *info = NULL;
    EXPECT_FAIL(strata_stat(s, "no-such-key", &info), STRATA_E_NOT_FOUND, "no-such-key");
    EXPECT_FAIL(strata_stat(s, "\xff\xfe", &info), STRATA_E_INVALID_ARGUMENT, "UTF-8");
    EXPECT_FAIL(strata_stat(s, NULL, &info), STRATA_E_INVALID_ARGUMENT, "key");
    EXPECT_FAIL(strata_stat(s, "k", NULL), STRATA_E_INVALID_ARGUMENT, "out");
    EXPECT_FAIL(strata_prepare(s, "", NULL, NULL, 0, NULL), STRATA_E_INVALID_ARGUMENT, "empty");
    strata_label bad_label[] = {{"key", "\xc3\x28"}};
    EXPECT_FAIL(strata_prepare(s, "k", NULL, bad_label, 1, NULL), STRATA_E_INVALID_ARGUMENT,
                "label value");
    EXPECT_FAIL(strata_prepare(s, "k", NULL, NULL, 2, NULL), STRATA_E_INVALID_ARGUMENT, "labels");
    EXPECT_FAIL(strata_prepare(s, "k", "no-parent", NULL, 0, NULL), STRATA_E_NOT_FOUND,
                "no-parent");
    CHECK(strata_prepare(s, "k", NULL, NULL, 0, NULL));
    EXPECT_FAIL(strata_prepare(s, "k", NULL, NULL, 0, NULL), STRATA_E_ALREADY_EXISTS, "k");
    CHECK(strata_commit(s, "layer", "k", NULL, 0));
    CHECK(strata_view(s, "v", "layer", NULL, 0, NULL));
    EXPECT_FAIL(strata_commit(s, "view-layer", "v", NULL, 0), STRATA_E_FAILED_PRECONDITION, "v");
    EXPECT_FAIL(strata_remove(s, "layer"), STRATA_E_FAILED_PRECONDITION, "layer");
    const char *bad_filter[] = {"kind=~"};
    int n = 0;
    EXPECT_FAIL(strata_walk(s, bad_filter, 1, count, &n), STRATA_E_INVALID_ARGUMENT, "kind");
    EXPECT_FAIL(strata_walk(s, NULL, 0, NULL, &n), STRATA_E_INVALID_ARGUMENT, "fn");

    /* Layers: bad descriptors, compressions and digests. */
    EXPECT_FAIL(strata_diff_fd(s, "layer", STRATA_COMPRESSION_NONE, -1, NULL),
                STRATA_E_INVALID_ARGUMENT, "-1");
    EXPECT_FAIL(strata_diff_fd(s, "layer", STRATA_COMPRESSION_NONE, 1000, NULL),
                STRATA_E_INVALID_ARGUMENT, "1000");
    EXPECT_FAIL(strata_diff_path(s, "layer", 7, "/dev/null", NULL), STRATA_E_INVALID_ARGUMENT,
                "compression");
    EXPECT_FAIL(strata_apply_layer_path(s, NULL, "/dev/null", "sha256:nothex", NULL, NULL),
                STRATA_E_INVALID_ARGUMENT, "sha256:nothex");
    EXPECT_FAIL(strata_apply_layer_path(s, NULL, "/nonexistent/layer.tar", NULL, NULL, NULL),
                STRATA_E_INTERNAL, "/nonexistent/layer.tar");
    EXPECT_FAIL(strata_mount(NULL, "/mnt"), STRATA_E_INVALID_ARGUMENT, "mounts");

    /* Freeing NULL is fine. */
    strata_free_mounts(NULL);
    strata_free_info(NULL);
    strata_free_descriptor(NULL);
    strata_free_applied(NULL);
    strata_free_layer(NULL);

    /* One handle, four threads. */
    pthread_t threads[4];
    struct worker workers[4];
    for (int i = 0; i < 4; i++) {
        workers[i] = (struct worker){.store = s, .n = i};
        ASSERT(pthread_create(&threads[i], NULL, build_chain, &workers[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        ASSERT(pthread_join(threads[i], NULL) == 0);
        ASSERT(workers[i].failures == 0);
    }
    n = 0;
    const char *committed[] = {"kind==committed"};
    CHECK(strata_walk(s, committed, 1, count, &n));
    ASSERT(n == 41);

    /* Use after close, and closing twice. */
    CHECK(strata_close(s));
    EXPECT_FAIL(strata_stat(s, "layer", &info), STRATA_E_CLOSED, "not open");
    EXPECT_FAIL(strata_close(s), STRATA_E_CLOSED, "not open");
    EXPECT_FAIL(strata_close(NULL), STRATA_E_INVALID_ARGUMENT, "store");
    ASSERT(strcmp(strata_status_name(STRATA_E_NOT_FOUND), "not-found") == 0);
    ASSERT(strcmp(strata_status_name(12345), "unknown") == 0);
    free(root);
    printf("errors: ok\n");
    return 0;
}
