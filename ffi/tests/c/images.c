/*
 * Images, leases, gc, fsck, verify, export, import, copy and checksum through the C ABI.
 *
 * Usage: images WORKDIR BACKEND   (WORKDIR exists and is empty; needs root to mount)
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

static char *join(const char *a, const char *b) {
    char *p = NULL;
    ASSERT(asprintf(&p, "%s/%s", a, b) > 0);
    return p;
}

/* A committed layer `name` on `parent` with one file `file` holding `content`. */
static void layer(strata_store *s, const char *mnt, const char *parent, const char *name,
                  const char *file, const char *content) {
    char key[128];
    snprintf(key, sizeof key, "%s-active", name);
    strata_mount_list *m = NULL;
    CHECK(strata_prepare(s, key, parent, NULL, 0, &m));
    CHECK(strata_mount(m, mnt));
    char *p = join(mnt, file);
    FILE *f = fopen(p, "w");
    ASSERT(f != NULL && fputs(content, f) >= 0 && fclose(f) == 0);
    free(p);
    CHECK(strata_unmount(mnt));
    strata_free_mounts(m);
    CHECK(strata_commit(s, name, key, NULL, 0));
}

/* Fails unless JSON document `doc` contains `needle`; frees it. */
static void json_has(char *doc, const char *needle) {
    ASSERT(doc != NULL);
    if (strstr(doc, needle) == NULL) {
        fprintf(stderr, "%s does not contain %s\n", doc, needle);
        exit(1);
    }
    strata_free_string(doc);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: images WORKDIR BACKEND\n");
        return 2;
    }
    const char *work = argv[1], *backend = argv[2];
    char *root_a = join(work, "a"), *root_b = join(work, "b"), *mnt = join(work, "mnt");
    char *layout = join(work, "layout"), *archive = join(work, "image.tar");
    char *archive_none = join(work, "none.tar");
    ASSERT(mkdir(mnt, 0755) == 0);
    strata_open_options opts = {.flags = STRATA_OPEN_NO_SYNC};
    strata_store *a = NULL, *b = NULL;
    CHECK(strata_open(root_a, backend, &opts, &a));

    layer(a, mnt, NULL, "base", "os-release", "strata test\n");
    layer(a, mnt, "base", "app", "app.conf", "answer = 42\n");
    layer(a, mnt, NULL, "loose", "tmp", "nothing holds this\n");

    /* Images and leases. */
    char *doc = NULL;
    CHECK(strata_tag(a, "example.org/app:1", "app"));
    EXPECT_FAIL(strata_tag(a, "example.org/app:2", "no-such"), STRATA_E_NOT_FOUND, "no-such");
    CHECK(strata_images(a, &doc));
    json_has(doc, "\"image\":\"example.org/app:1\"");
    CHECK(strata_lease_create(a, "build-42", 0));
    const char *held[] = {"loose"};
    CHECK(strata_lease_add(a, "build-42", held, 1));
    CHECK(strata_leases(a, &doc));
    json_has(doc, "\"snapshots\":[\"loose\"]");

    /* prepare_in: held by the lease from its creation; a missing lease makes nothing. */
    EXPECT_FAIL(strata_prepare_in(a, "no-lease", "step", "base", NULL, 0, NULL),
                STRATA_E_NOT_FOUND, "no-lease");
    EXPECT_FAIL(strata_stat(a, "step", &(strata_info *){NULL}), STRATA_E_NOT_FOUND, "step");
    CHECK(strata_lease_create(a, "step-lease", 0));
    CHECK(strata_prepare_in(a, "step-lease", "step", "base", NULL, 0, NULL));
    EXPECT_FAIL(strata_remove(a, "step"), STRATA_E_FAILED_PRECONDITION, "step-lease");
    CHECK(strata_lease_remove(a, "step-lease"));
    CHECK(strata_remove(a, "step"));

    /* gc keeps what the image and the lease hold; without the lease, loose goes. */
    CHECK(strata_gc(a, true, &doc));
    json_has(doc, "\"removed\":[]");
    CHECK(strata_lease_remove(a, "build-42"));
    CHECK(strata_gc(a, true, &doc));
    json_has(doc, "\"removed\":[\"loose\"]");
    CHECK(strata_gc(a, false, &doc));
    json_has(doc, "\"dry_run\":false");
    EXPECT_FAIL(strata_stat(a, "loose", &(strata_info *){NULL}), STRATA_E_NOT_FOUND, "loose");

    /* apply-layer in a lease (a pull): held from its first moment until the lease goes. */
    char *pulled = join(work, "pulled.tar");
    CHECK(strata_diff_path(a, "base", STRATA_COMPRESSION_NONE, pulled, NULL));
    strata_layer *pl = NULL;
    EXPECT_FAIL(strata_apply_layer_in_path(a, "no-lease", NULL, pulled, NULL, NULL, &pl),
                STRATA_E_NOT_FOUND, "no-lease");
    CHECK(strata_lease_create(a, "pull-1", 0));
    CHECK(strata_apply_layer_in_path(a, "pull-1", NULL, pulled, NULL, NULL, &pl));
    CHECK(strata_gc(a, false, &doc));
    json_has(doc, "\"removed\":[]");
    CHECK(strata_leases(a, &doc));
    json_has(doc, pl->name);
    CHECK(strata_lease_remove(a, "pull-1"));
    CHECK(strata_gc(a, false, &doc));
    json_has(doc, pl->name);
    strata_free_layer(pl);
    free(pulled);

    /* fsck and verify. */
    CHECK(strata_fsck(a, false, &doc));
    json_has(doc, "\"clean\":true");
    CHECK(strata_verify(a, NULL, 0, NULL));
    const char *names[] = {"app"};
    CHECK(strata_verify(a, names, 1, &doc));
    json_has(doc, "\"damaged\":[]");

    /* Export as a layout and an archive; import the archive into a fresh store. */
    const char *images[] = {"example.org/app:1"};
    CHECK(strata_export(a, images, 1, layout, STRATA_COMPRESSION_GZIP, true, &doc));
    json_has(doc, "\"name\":\"example.org/app:1\"");
    char *index = join(layout, "index.json");
    ASSERT(access(index, F_OK) == 0);
    free(index);
    CHECK(strata_export(a, images, 1, archive, STRATA_COMPRESSION_ZSTD, false, NULL));
    const char *missing[] = {"example.org/none:1"};
    EXPECT_FAIL(strata_export(a, missing, 1, archive_none, STRATA_COMPRESSION_NONE, false, NULL),
                STRATA_E_NOT_FOUND, "example.org/none:1");
    CHECK(strata_open(root_b, backend, &opts, &b));
    CHECK(strata_import(b, archive, NULL, &doc));
    json_has(doc, "\"applied\":2");
    CHECK(strata_images(b, &doc));
    json_has(doc, "example.org/app:1");

    /* The same image has the same checksum in both stores. */
    char *sum_a = NULL, *sum_b = NULL;
    CHECK(strata_checksum(a, "example.org/app:1", NULL, 0, NULL, 0, &sum_a));
    CHECK(strata_checksum(b, "example.org/app:1", NULL, 0, NULL, 0, &sum_b));
    ASSERT(strncmp(sum_a, "sha256:", 7) == 0 && strcmp(sum_a, sum_b) == 0);
    const char *one[] = {"/app.conf"};
    char *sum_one = NULL;
    CHECK(strata_checksum(b, "example.org/app:1", one, 1, NULL, 0, &sum_one));
    ASSERT(strcmp(sum_one, sum_a) != 0);
    EXPECT_FAIL(strata_checksum(b, "example.org/app:1", NULL, 0, NULL, 0, NULL),
                STRATA_E_INVALID_ARGUMENT, "out");

    /* COPY --from: app.conf of the image into a new snapshot, owned by 1000:1000. */
    CHECK(strata_prepare(b, "step", NULL, NULL, 0, NULL));
    strata_copy_options copy = {.chown = true, .uid = 1000, .gid = 1000};
    CHECK(strata_copy(b, "example.org/app:1", one, 1, "step", "/srv/", &copy, &doc));
    json_has(doc, "\"files\":1");
    strata_mount_list *m = NULL;
    CHECK(strata_mounts(b, "step", &m));
    CHECK(strata_mount(m, mnt));
    strata_free_mounts(m);
    char *copied = join(mnt, "srv/app.conf");
    struct stat st;
    ASSERT(stat(copied, &st) == 0 && st.st_uid == 1000 && st.st_gid == 1000);
    free(copied);
    CHECK(strata_unmount(mnt));
    EXPECT_FAIL(strata_copy(b, "example.org/app:1", one, 1, "base-of-nothing", "/", NULL, NULL),
                STRATA_E_NOT_FOUND, "base-of-nothing");

    CHECK(strata_untag(a, "example.org/app:1"));
    CHECK(strata_images(a, &doc));
    json_has(doc, "[]");
    strata_free_string(NULL);
    strata_free_string(sum_a);
    strata_free_string(sum_b);
    strata_free_string(sum_one);
    CHECK(strata_close(a));
    CHECK(strata_close(b));
    free(root_a);
    free(root_b);
    free(mnt);
    free(layout);
    free(archive);
    free(archive_none);
    printf("images: ok\n");
    return 0;
}
