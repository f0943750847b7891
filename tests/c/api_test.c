/* The C API against a real daemon, built with -Wall -Wextra -Werror and the address and
 * undefined-behaviour sanitizers against the installed header and library.
 *
 *     api_test SOCKET
 */
#include <unicorn.h>

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            char msg_[512];                                                           \
            unicorn_last_error(msg_, sizeof msg_);                                    \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,   \
                    __LINE__, #cond, msg_);                                           \
            failures++;                                                               \
        }                                                                             \
    } while (0)

#define REQUIRE(cond)                                                                 \
    do {                                                                              \
        CHECK(cond);                                                                  \
        if (failures) return EXIT_FAILURE;                                            \
    } while (0)

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Submits `total` NOPs and reaps them from a poll() loop on the completion descriptor, the
 * way a game or UI event loop would; every NOP must complete exactly once. */
static int async_nops(unicorn_client *c, size_t total) {
    unsigned char *seen = calloc(total, 1);
    uint64_t ids[256];
    unicorn_completion done[256];
    size_t next = 0, completed = 0;
    int fd = unicorn_completion_fd(c);
    CHECK(fd >= 0);
    while (completed < total) {
        if (next < total) {
            size_t want = total - next < 256 ? total - next : 256, queued = 0;
            for (size_t i = 0; i < want; i++) ids[i] = (uint64_t)(next + i);
            CHECK(unicorn_submit_nops(c, ids, want, &queued) == UNICORN_OK);
            next += queued;
        }
        size_t n = 0;
        CHECK(unicorn_reap(c, done, 256, &n) == UNICORN_OK);
        if (n == 0) {
            /* The empty reap armed the descriptor. */
            struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
            int r = poll(&p, 1, 10000);
            CHECK(r == 1);
            if (r != 1) break;
        }
        for (size_t i = 0; i < n; i++) {
            CHECK(done[i].status == UNICORN_OK);
            CHECK(done[i].user_data < total);
            if (done[i].user_data < total) {
                CHECK(seen[done[i].user_data] == 0);
                seen[done[i].user_data] = 1;
            }
        }
        completed += n;
    }
    for (size_t i = 0; i < total; i++) CHECK(seen[i] == 1);
    free(seen);
    return completed == total;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
        return 2;
    }
    const char *sock = argv[1];

    /* Versions and static strings. */
    CHECK(unicorn_abi_version() == ((UNICORN_ABI_MAJOR << 16) | UNICORN_ABI_MINOR));
    CHECK(strcmp(unicorn_version_string(), UNICORN_VERSION) == 0);
    CHECK(strcmp(unicorn_status_str(UNICORN_OK), "ok") == 0);
    CHECK(strcmp(unicorn_status_str(UNICORN_ERR_LIMIT_EXCEEDED), "limit exceeded") == 0);
    CHECK(strcmp(unicorn_status_str(-7), "unknown status") == 0);
    CHECK(strcmp(unicorn_status_str(12345), "unknown status") == 0);

    /* NULL handles and arguments are errors, never crashes. */
    unicorn_disconnect(NULL);
    CHECK(unicorn_completion_fd(NULL) == -1);
    CHECK(unicorn_ping(NULL, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    char msg[256];
    size_t len = unicorn_last_error(msg, sizeof msg);
    CHECK(len > 0 && strstr(msg, "NULL") != NULL);
    char tiny[4];
    CHECK(unicorn_last_error(tiny, sizeof tiny) == len && strlen(tiny) == 3);
    CHECK(unicorn_last_error(NULL, 0) == len);
    CHECK(unicorn_connect_options_init(NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_connect(sock, NULL) == UNICORN_ERR_INVALID_ARGUMENT);

    /* No daemon at a path: a clear status and no client. */
    unicorn_client *none = NULL;
    CHECK(unicorn_connect("/nonexistent/unicorn.sock", &none) == UNICORN_ERR_NO_DAEMON);
    CHECK(none == NULL);

    /* A default client: ping round trips. */
    unicorn_client *c = NULL;
    REQUIRE(unicorn_connect(sock, &c) == UNICORN_OK && c != NULL);
    uint64_t rtts[1000];
    for (int i = 0; i < 1000; i++) REQUIRE(unicorn_ping(c, &rtts[i]) == UNICORN_OK);
    qsort(rtts, 1000, sizeof rtts[0], cmp_u64);
    CHECK(rtts[0] > 0);

    /* Nothing in flight: waiting returns at once; reaping finds nothing. */
    CHECK(unicorn_wait(c, 1000) == UNICORN_ERR_WOULD_BLOCK);
    size_t n = 99;
    CHECK(unicorn_reap(c, NULL, 0, &n) == UNICORN_OK && n == 0);
    CHECK(unicorn_reap(c, NULL, 5, &n) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_submit_nops(c, NULL, 3, &n) == UNICORN_ERR_INVALID_ARGUMENT);

    /* A client with options: spin mode, a name, a small ring. */
    unicorn_connect_options o;
    REQUIRE(unicorn_connect_options_init(&o) == UNICORN_OK);
    CHECK(o.struct_size == sizeof o);
    o.socket_path = sock;
    o.client_name = "c-api-test";
    o.wait_mode = UNICORN_WAIT_MODE_SPIN;
    o.spin_us = 200;
    o.sq_entries = 64;
    o.priority = UNICORN_PRIORITY_BACKGROUND;
    unicorn_client *s = NULL;
    REQUIRE(unicorn_connect_opts(&o, &s) == UNICORN_OK && s != NULL);
    o.wait_mode = 99;
    unicorn_client *bad = NULL;
    CHECK(unicorn_connect_opts(&o, &bad) == UNICORN_ERR_INVALID_ARGUMENT && bad == NULL);

    /* Many asynchronous NOPs on both clients. */
    CHECK(async_nops(s, 20000));
    CHECK(async_nops(c, 5000));

    /* unicorn_wait with jobs in flight. */
    uint64_t one = 42;
    CHECK(unicorn_submit_nops(c, &one, 1, &n) == UNICORN_OK && n == 1);
    CHECK(unicorn_wait(c, 10000) == UNICORN_OK);
    unicorn_completion got;
    CHECK(unicorn_reap(c, &got, 1, &n) == UNICORN_OK && n == 1 && got.user_data == 42);

    unicorn_disconnect(s);
    unicorn_disconnect(c);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    printf("c api test ok: ping p50 %llu ns, p99 %llu ns\n", (unsigned long long)rtts[500],
           (unsigned long long)rtts[990]);
    return EXIT_SUCCESS;
}
