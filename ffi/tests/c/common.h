/* Helpers shared by the C tests of strata's ABI. */
#ifndef STRATA_TEST_COMMON_H
#define STRATA_TEST_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata.h>

/* Fails the test unless `call` returned STRATA_OK, printing strata's message. */
#define CHECK(call)                                                                     \
    do {                                                                                \
        int rc_ = (call);                                                               \
        if (rc_ != STRATA_OK) {                                                         \
            fprintf(stderr, "%s:%d: %s: %s (%d): %s\n", __FILE__, __LINE__, #call,      \
                    strata_status_name(rc_), rc_, strata_last_error());                 \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* Fails the test unless `call` returned `want` and the message contains `needle`. */
#define EXPECT_FAIL(call, want, needle)                                                 \
    do {                                                                                \
        int rc_ = (call);                                                               \
        if (rc_ != (want)) {                                                            \
            fprintf(stderr, "%s:%d: %s returned %s (%d), expected %s: %s\n", __FILE__,  \
                    __LINE__, #call, strata_status_name(rc_), rc_,                      \
                    strata_status_name(want), strata_last_error());                     \
            exit(1);                                                                    \
        }                                                                               \
        if (strstr(strata_last_error(), (needle)) == NULL) {                            \
            fprintf(stderr, "%s:%d: %s: message \"%s\" does not mention \"%s\"\n",      \
                    __FILE__, __LINE__, #call, strata_last_error(), (needle));          \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* Fails the test unless `cond` holds. */
#define ASSERT(cond)                                                                    \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

#endif
