/* The install test's client: connects to the daemon at SOCKET (argv[1]) through the installed
 * libunicorn, built with `pkg-config --cflags --libs unicorn-npu`, and pings it. On failure it
 * prints the status and the library's message, as a program would show them to its user.
 *
 *     test-client SOCKET
 */
#include <unicorn.h>

#include <stdio.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test-client SOCKET\n");
        return 2;
    }
    unicorn_client *c = NULL;
    unicorn_status st = unicorn_connect(argv[1], &c);
    if (st != UNICORN_OK) {
        char msg[512];
        unicorn_last_error(msg, sizeof msg);
        fprintf(stderr, "test-client: %s: %s\n", unicorn_status_str(st), msg);
        return 1;
    }
    uint64_t rtt_ns = 0;
    st = unicorn_ping(c, &rtt_ns);
    if (st != UNICORN_OK) {
        char msg[512];
        unicorn_last_error(msg, sizeof msg);
        fprintf(stderr, "test-client: ping: %s: %s\n", unicorn_status_str(st), msg);
        unicorn_disconnect(c);
        return 1;
    }
    printf("test-client: libunicorn %s connected, ping %llu ns\n", unicorn_version_string(),
           (unsigned long long)rtt_ns);
    unicorn_disconnect(c);
    return 0;
}
