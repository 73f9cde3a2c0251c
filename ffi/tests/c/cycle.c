/*
 * The whole cycle through the C ABI: prepare, write through the mount, commit, diff to a
 * file, apply-layer into a fresh store, and compare the two trees; then stat, usage, update,
 * walk, views, remove and cleanup.
 *
 * Usage: cycle WORKDIR BACKEND   (WORKDIR exists and is empty; needs root to mount)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

static char *join(const char *a, const char *b) {
    char *p = NULL;
    ASSERT(asprintf(&p, "%s/%s", a, b) > 0);
    return p;
}

static void write_file(const char *dir, const char *name, const char *content) {
    char *p = join(dir, name);
    FILE *f = fopen(p, "w");
    ASSERT(f != NULL);
    ASSERT(fputs(content, f) >= 0);
    ASSERT(fclose(f) == 0);
    free(p);
}

/* Compares two trees: same names, types, modes, sizes, contents and link targets. */
static void same_tree(const char *a, const char *b) {
    struct dirent **ea = NULL, **eb = NULL;
    int na = scandir(a, &ea, NULL, alphasort);
    int nb = scandir(b, &eb, NULL, alphasort);
    ASSERT(na >= 0 && nb >= 0);
    if (na != nb) {
        fprintf(stderr, "%s has %d entries, %s has %d\n", a, na, b, nb);
        exit(1);
    }
    for (int i = 0; i < na; i++) {
        const char *n = ea[i]->d_name;
        ASSERT(strcmp(n, eb[i]->d_name) == 0);
        if (strcmp(n, ".") == 0 || strcmp(n, "..") == 0) continue;
        char *pa = join(a, n), *pb = join(b, n);
        struct stat sa, sb;
        ASSERT(lstat(pa, &sa) == 0 && lstat(pb, &sb) == 0);
        if (sa.st_mode != sb.st_mode || sa.st_uid != sb.st_uid || sa.st_gid != sb.st_gid) {
            fprintf(stderr, "%s and %s differ in mode or owner\n", pa, pb);
            exit(1);
        }
        if (S_ISDIR(sa.st_mode)) {
            same_tree(pa, pb);
        } else if (S_ISLNK(sa.st_mode)) {
            char la[4096], lb[4096];
            ssize_t ra = readlink(pa, la, sizeof la), rb = readlink(pb, lb, sizeof lb);
            ASSERT(ra >= 0 && ra == rb && memcmp(la, lb, (size_t)ra) == 0);
        } else if (S_ISREG(sa.st_mode)) {
            ASSERT(sa.st_size == sb.st_size);
            FILE *fa = fopen(pa, "r"), *fb = fopen(pb, "r");
            ASSERT(fa != NULL && fb != NULL);
            int ca, cb;
            do {
                ca = fgetc(fa);
                cb = fgetc(fb);
                ASSERT(ca == cb);
            } while (ca != EOF);
            fclose(fa);
            fclose(fb);
        }
        free(pa);
        free(pb);
    }
    for (int i = 0; i < na; i++) free(ea[i]);
    for (int i = 0; i < nb; i++) free(eb[i]);
    free(ea);
    free(eb);
}

struct walk_count {
    int committed;
    int stop_after;
    int seen;
};

static int count_committed(const strata_info *info, void *user) {
    struct walk_count *c = user;
    c->seen++;
    if (info->kind == STRATA_KIND_COMMITTED) c->committed++;
    return c->stop_after > 0 && c->seen >= c->stop_after;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: cycle WORKDIR BACKEND\n");
        return 2;
    }
    const char *work = argv[1], *backend = argv[2];
    char *root_a = join(work, "a"), *root_b = join(work, "b");
    char *mnt = join(work, "mnt"), *mnt_b = join(work, "mnt-b");
    char *layer_file = join(work, "layer.tar.gz");
    ASSERT(mkdir(mnt, 0755) == 0 && mkdir(mnt_b, 0755) == 0);
    printf("strata %s, backend %s\n", strata_version(), backend);

    strata_open_options opts = {.flags = STRATA_OPEN_NO_SYNC, .lock_timeout_ms = 5000};
    strata_store *a = NULL;
    CHECK(strata_open(root_a, backend, &opts, &a));

    /* A base layer, then a child with files, a directory, a symlink and a deletion. */
    strata_mount_list *m = NULL;
    strata_label labels[] = {{"org.example.step", "base"}};
    CHECK(strata_prepare(a, "base-active", NULL, labels, 1, &m));
    ASSERT(m->len >= 1 && m->mounts[0].fs_type != NULL);
    CHECK(strata_mount(m, mnt));
    write_file(mnt, "gone", "deleted by the next layer\n");
    write_file(mnt, "kept", "from the base\n");
    CHECK(strata_unmount(mnt));
    strata_free_mounts(m);
    CHECK(strata_commit(a, "base", "base-active", labels, 1));

    CHECK(strata_prepare(a, "build", "base", NULL, 0, &m));
    CHECK(strata_mount(m, mnt));
    char *dir = join(mnt, "etc");
    ASSERT(mkdir(dir, 0750) == 0);
    write_file(dir, "app.conf", "answer = 42\n");
    char *link = join(mnt, "conf");
    ASSERT(symlink("etc/app.conf", link) == 0);
    char *gone = join(mnt, "gone");
    ASSERT(unlink(gone) == 0);
    free(dir);
    free(link);
    free(gone);
    CHECK(strata_unmount(mnt));
    strata_free_mounts(m);
    CHECK(strata_commit(a, "app", "build", NULL, 0));

    /* stat, usage, update, walk. */
    strata_info *info = NULL;
    CHECK(strata_stat(a, "app", &info));
    ASSERT(info->kind == STRATA_KIND_COMMITTED);
    ASSERT(strcmp(info->name, "app") == 0 && strcmp(info->parent, "base") == 0);
    ASSERT(info->labels_len == 0 && info->created_unix_nanos > 0);
    strata_free_info(info);
    strata_disk_usage usage = {0};
    CHECK(strata_usage(a, "app", &usage));
    ASSERT(usage.size > 0 || usage.inodes > 0); /* devmapper counts blocks, not inodes */
    strata_label more[] = {{"org.example.step", "app"}, {"org.example.owner", "c"}};
    CHECK(strata_update(a, "app", more, 2, NULL, 0, &info));
    ASSERT(info->labels_len == 2);
    ASSERT(strcmp(info->labels[0].key, "org.example.owner") == 0);
    strata_free_info(info);
    struct walk_count count = {0};
    const char *filters[] = {"kind==committed"};
    CHECK(strata_walk(a, filters, 1, count_committed, &count));
    ASSERT(count.committed == 2 && count.seen == 2);
    struct walk_count first = {.stop_after = 1};
    CHECK(strata_walk(a, NULL, 0, count_committed, &first));
    ASSERT(first.seen == 1);

    /* diff to a file, and to a descriptor. */
    strata_descriptor *desc = NULL;
    CHECK(strata_diff_path(a, "app", STRATA_COMPRESSION_GZIP, layer_file, &desc));
    ASSERT(strncmp(desc->digest, "sha256:", 7) == 0 && desc->size > 0);
    ASSERT(strstr(desc->media_type, "gzip") != NULL);
    printf("layer %s, diffID %s, %llu bytes\n", desc->digest, desc->diff_id,
           (unsigned long long)desc->size);
    char *plain = join(work, "layer.tar");
    int fd = open(plain, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ASSERT(fd >= 0);
    strata_descriptor *desc_plain = NULL;
    CHECK(strata_diff_fd(a, "app", STRATA_COMPRESSION_NONE, fd, &desc_plain));
    ASSERT(close(fd) == 0);
    ASSERT(strcmp(desc_plain->diff_id, desc->diff_id) == 0);
    ASSERT(strcmp(desc_plain->digest, desc_plain->diff_id) == 0);

    /* apply-layer into a fresh store: the base from its own diff, then the app layer. */
    char *base_file = join(work, "base.tar");
    CHECK(strata_diff_path(a, "base", STRATA_COMPRESSION_NONE, base_file, NULL));
    strata_store *b = NULL;
    CHECK(strata_open(root_b, backend, &opts, &b));
    strata_layer *lb = NULL, *la = NULL, *again = NULL;
    CHECK(strata_apply_layer_path(b, NULL, base_file, NULL, NULL, &lb));
    ASSERT(!lb->cached);
    fd = open(layer_file, O_RDONLY | O_CLOEXEC);
    ASSERT(fd >= 0);
    CHECK(strata_apply_layer_fd(b, lb->name, fd, desc->digest, NULL, &la));
    ASSERT(close(fd) == 0);
    ASSERT(strcmp(la->diff_id, desc->diff_id) == 0 && !la->cached);
    /* The same layer again, by diffID: a cache hit that reads nothing. */
    CHECK(strata_apply_layer_path(b, lb->name, layer_file, NULL, desc->diff_id, &again));
    ASSERT(again->cached && strcmp(again->name, la->name) == 0);

    /* Both trees, through views. */
    strata_mount_list *va = NULL, *vb = NULL;
    CHECK(strata_view(a, "check-a", "app", NULL, 0, &va));
    CHECK(strata_view(b, "check-b", la->name, NULL, 0, &vb));
    CHECK(strata_mount(va, mnt));
    CHECK(strata_mount(vb, mnt_b));
    same_tree(mnt, mnt_b);
    char *conf = join(mnt_b, "conf");
    char target[64] = {0};
    ASSERT(readlink(conf, target, sizeof target - 1) > 0 && strcmp(target, "etc/app.conf") == 0);
    char *gone_b = join(mnt_b, "gone");
    ASSERT(access(gone_b, F_OK) != 0 && errno == ENOENT);
    CHECK(strata_unmount(mnt));
    CHECK(strata_unmount(mnt_b));
    strata_free_mounts(va);
    strata_free_mounts(vb);
    CHECK(strata_mounts(b, "check-b", &vb));
    ASSERT(vb->len >= 1);
    strata_free_mounts(vb);

    /* apply into an active snapshot, then remove and clean up. */
    strata_applied *applied = NULL;
    CHECK(strata_prepare(b, "scratch", lb->name, NULL, 0, NULL));
    CHECK(strata_apply_path(b, "scratch", layer_file, desc->digest, &applied));
    ASSERT(applied->entries >= 3 && strcmp(applied->descriptor.diff_id, desc->diff_id) == 0);
    CHECK(strata_remove(b, "scratch"));
    CHECK(strata_remove(b, "check-b"));
    CHECK(strata_remove(a, "check-a"));
    CHECK(strata_cleanup(a));
    CHECK(strata_cleanup(b));

    strata_free_applied(applied);
    strata_free_layer(lb);
    strata_free_layer(la);
    strata_free_layer(again);
    strata_free_descriptor(desc);
    strata_free_descriptor(desc_plain);
    CHECK(strata_close(a));
    CHECK(strata_close(b));
    free(root_a);
    free(root_b);
    free(mnt);
    free(mnt_b);
    free(layer_file);
    free(plain);
    free(base_file);
    free(conf);
    free(gone_b);
    printf("cycle: ok\n");
    return 0;
}
