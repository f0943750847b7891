/* decode-worker: one client process of the many-clients benchmark (scripts/bench-clients.py),
 * written against the C API of libunicorn.so.1: what an editor plugin, a game or a chat app that
 * links the library runs. The same worker as `unicorn bench decode-worker` (the CLI, a Rust
 * client) and scripts/peer-worker.py (llama.cpp), measured the same way:
 *
 *     decode-worker --socket PATH --model PATH [--tokens N] [--prompt-tokens N] [--warmup N]
 *
 * It loads the model through the daemon (which shares it between processes), prefills
 * --prompt-tokens tokens cut from the benchmarks' common text, decodes --warmup greedy tokens
 * untimed, then prints "ready" and waits for a line on stdin (the orchestrator releases every
 * worker at once). It then decodes --tokens greedy tokens, one unicorn_decode_sample per token,
 * timing each, and prints one JSON line: the per-token latency percentiles, the wall-clock start
 * and end (Unix time in nanoseconds, comparable across processes), its own resident memory and
 * the first generated token ids. Last it waits for one more line (or the end of stdin) before it
 * exits, so that the orchestrator can read every process's memory while all are alive.
 *
 * scripts/bench builds it (cc -std=c11 -O2) against the header and the library it built.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <unicorn.h>

#include <errno.h>
#include <stdbool.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The text the prompt is cut from: the same as the CLI's benchmarks and scripts/peer-bench.py,
 * so that every engine sees the same tokens (a test checks that the CLI's copy is this one). */
static const char PROMPT_TEXT[] =
    "The history of computing is a story of ideas that took decades to mature. Early machines filled rooms and were programmed by rewiring panels; later, stored programs, compilers and operating systems made them general tools. Today a small model can run on a laptop, turning a prompt into text one token at a time, and the speed of that loop depends on memory bandwidth, cache sizes, vector instructions and careful engineering of every kernel. ";

/* How many generated token ids the JSON line shows: a check that every worker, of any engine,
 * generated the same text. */
#define HEAD_TOKENS 16

static void report(const char *what) {
    char msg[1024];
    unicorn_last_error(msg, sizeof msg);
    fprintf(stderr, "decode-worker: %s: %s\n", what, msg);
}

static uint64_t clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A "kB" field of /proc/self/status; 0 when absent. */
static long status_kib(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL) return 0;
    char line[256];
    size_t len = strlen(field);
    long kib = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, field, len) == 0 && line[len] == ':') {
            kib = strtol(line + len + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kib;
}

/* Prints `word` (unless NULL) and waits for a line on stdin; the end of stdin releases too. */
static void barrier(const char *word) {
    if (word != NULL) {
        printf("%s\n", word);
        fflush(stdout);
    }
    int c;
    while ((c = getchar()) != EOF && c != '\n') {
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile of `n` sorted samples, nearest rank (as the CLI's benchmarks take it). */
static uint64_t percentile(const uint64_t *sorted, size_t n, double p) {
    if (n == 0) return 0;
    double r = p / 100.0 * (double)n;
    size_t rank = (size_t)r;
    if ((double)rank < r) rank++;
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

static double ms(uint64_t ns) { return (double)ns / 1e6; }

/* Writes `s` as a JSON string: quotes, backslashes and control characters escaped. */
static void json_string(const char *s) {
    putchar('"');
    for (const unsigned char *c = (const unsigned char *)s; *c != '\0'; c++) {
        if (*c == '"' || *c == '\\') {
            printf("\\%c", *c);
        } else if (*c < 0x20) {
            printf("\\u%04x", *c);
        } else {
            putchar(*c);
        }
    }
    putchar('"');
}

/* Parses a count for `flag` into `*out`: a decimal in [min, 1 << 20]. */
static int parse_count(const char *flag, const char *arg, long min, long *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(arg, &end, 10);
    if (errno != 0 || end == arg || *end != '\0' || v < min || v > (1L << 20)) {
        fprintf(stderr, "decode-worker: %s wants a number from %ld to %ld, got %s\n", flag, min,
                1L << 20, arg);
        return -1;
    }
    *out = v;
    return 0;
}

static int usage(FILE *to) {
    fprintf(to, "usage: decode-worker --socket PATH --model PATH [--tokens N] "
                "[--prompt-tokens N] [--warmup N]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *socket_path = NULL, *model_path = NULL;
    long n_tokens = 128, n_prompt = 16, n_warmup = 4;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        const char *known[] = {"--socket", "--model", "-m", "--tokens", "--prompt-tokens",
                               "--warmup"};
        bool is_known = false;
        for (size_t k = 0; k < sizeof known / sizeof *known; k++) {
            is_known |= strcmp(flag, known[k]) == 0;
        }
        if (!is_known) {
            fprintf(stderr, "decode-worker: unknown option %s\n", flag);
            return usage(stderr);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "decode-worker: %s wants a value\n", flag);
            return usage(stderr);
        }
        const char *arg = argv[++i];
        if (strcmp(flag, "--socket") == 0) {
            socket_path = arg;
        } else if (strcmp(flag, "--model") == 0 || strcmp(flag, "-m") == 0) {
            model_path = arg;
        } else if (strcmp(flag, "--tokens") == 0) {
            if (parse_count(flag, arg, 1, &n_tokens) != 0) return 2;
        } else if (strcmp(flag, "--prompt-tokens") == 0) {
            if (parse_count(flag, arg, 1, &n_prompt) != 0) return 2;
        } else {
            if (parse_count(flag, arg, 0, &n_warmup) != 0) return 2;
        }
    }
    if (model_path == NULL) {
        fprintf(stderr, "decode-worker: --model is required\n");
        return usage(stderr);
    }

    int rc = 1;
    unicorn_client *client = NULL;
    unicorn_model *model = NULL;
    unicorn_context *ctx = NULL;
    uint32_t *base = NULL, *prompt = NULL;
    uint64_t *latencies = NULL;

    unicorn_connect_options opts;
    unicorn_connect_options_init(&opts);
    opts.socket_path = socket_path;
    opts.client_name = "decode-worker";
    if (unicorn_connect_opts(&opts, &client) != UNICORN_OK) {
        report("connecting to unicornd");
        goto out;
    }
    if (unicorn_model_load(client, model_path, &model) != UNICORN_OK) {
        report(model_path);
        goto out;
    }
    unicorn_model_desc desc = {.struct_size = sizeof desc};
    if (unicorn_model_info(model, &desc) != UNICORN_OK) {
        report("model info");
        goto out;
    }

    /* The prompt: BOS when the model wants it, then the text's tokens, repeated as needed. */
    size_t text_len = strlen(PROMPT_TEXT), cap = text_len + 2, n_base = 0;
    base = malloc(cap * sizeof *base);
    prompt = malloc((size_t)n_prompt * sizeof *prompt);
    latencies = malloc((size_t)n_tokens * sizeof *latencies);
    if (base == NULL || prompt == NULL || latencies == NULL) {
        fprintf(stderr, "decode-worker: out of memory\n");
        goto out;
    }
    if (unicorn_tokenize(model, PROMPT_TEXT, text_len, false, false, base, cap, &n_base) !=
        UNICORN_OK) {
        report("tokenizing the prompt");
        goto out;
    }
    if (n_base == 0) {
        fprintf(stderr, "decode-worker: the prompt text has no tokens\n");
        goto out;
    }
    size_t np = 0;
    if (desc.add_bos && desc.bos >= 0) prompt[np++] = (uint32_t)desc.bos;
    while (np < (size_t)n_prompt) {
        for (size_t k = 0; k < n_base && np < (size_t)n_prompt; k++) prompt[np++] = base[k];
    }

    /* Room for every position, rounded up as the CLI's worker does (the same KV cache). */
    long need = n_prompt + n_warmup + n_tokens;
    if (need < 64) need = 64;
    unicorn_context_params params;
    unicorn_context_params_init(&params);
    params.n_ctx = (uint32_t)((need + 255) / 256 * 256);
    params.kv_f32 = false;
    unicorn_sampler_params_greedy(&params.sampler);
    if (unicorn_context_create(model, &params, &ctx) != UNICORN_OK) {
        report("creating a context");
        goto out;
    }

    uint32_t next = 0;
    if (unicorn_decode_sample(ctx, prompt, np, &next) != UNICORN_OK) {
        report("decoding the prompt");
        goto out;
    }
    for (long i = 0; i < n_warmup; i++) {
        if (unicorn_decode_sample(ctx, &next, 1, &next) != UNICORN_OK) {
            report("decoding");
            goto out;
        }
    }

    barrier("ready");
    uint64_t start_ns = clock_ns(CLOCK_REALTIME);
    uint64_t t0 = clock_ns(CLOCK_MONOTONIC);
    uint32_t head[HEAD_TOKENS];
    size_t n_head = 0;
    for (long i = 0; i < n_tokens; i++) {
        uint64_t t = clock_ns(CLOCK_MONOTONIC);
        if (unicorn_decode_sample(ctx, &next, 1, &next) != UNICORN_OK) {
            report("decoding");
            goto out;
        }
        latencies[i] = clock_ns(CLOCK_MONOTONIC) - t;
        if (n_head < HEAD_TOKENS) head[n_head++] = next;
    }
    uint64_t elapsed = clock_ns(CLOCK_MONOTONIC) - t0;
    uint64_t end_ns = clock_ns(CLOCK_REALTIME);

    long rss = status_kib("VmRSS"), hwm = status_kib("VmHWM");
    uint64_t sum = 0;
    for (long i = 0; i < n_tokens; i++) sum += latencies[i];
    qsort(latencies, (size_t)n_tokens, sizeof *latencies, cmp_u64);
    size_t n = (size_t)n_tokens;
    const char *file = strrchr(model_path, '/');
    printf("{\"engine\": \"unicorn\", \"client\": \"c\", \"pid\": %ld, \"model\": ",
           (long)getpid());
    json_string(file != NULL ? file + 1 : model_path);
    printf(", \"tokens\": %ld, \"prompt_tokens\": %ld, \"warmup\": %ld, \"start_ns\": %" PRIu64
           ", \"end_ns\": %" PRIu64 ", \"seconds\": %.6f, \"tokens_per_s\": %.3f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"mean_ms\": %.3f, \"max_ms\": %.3f, "
           "\"rss_kib\": %ld, \"hwm_kib\": %ld, \"head\": [",
           n_tokens, n_prompt, n_warmup, start_ns, end_ns,
           (double)elapsed / 1e9, (double)n_tokens * 1e9 / (double)elapsed,
           ms(percentile(latencies, n, 50.0)), ms(percentile(latencies, n, 99.0)),
           ms(sum / n), ms(latencies[n - 1]), rss, hwm);
    for (size_t k = 0; k < n_head; k++) printf("%s%" PRIu32, k ? ", " : "", head[k]);
    printf("]}\n");
    fflush(stdout);
    /* Stay alive (with the context) until the orchestrator has read everyone's memory. */
    barrier(NULL);
    rc = 0;

out:
    unicorn_context_free(ctx);
    unicorn_model_free(model);
    unicorn_disconnect(client);
    free(latencies);
    free(prompt);
    free(base);
    return rc;
}
