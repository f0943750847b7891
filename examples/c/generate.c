/* generate: text generation through unicornd with the C API of libunicorn.
 *
 *     generate [-m MODEL] [-n N] PROMPT
 *
 * Loads MODEL (a GGUF file; default: SmolLM2-135M-Instruct.Q4_1.gguf in $UNICORN_MODEL_DIR, else
 * in ${XDG_CACHE_HOME:-~/.cache}/unicorn/models, where scripts/fetch-model puts it), feeds it
 * PROMPT and prints the prompt followed by up to N (default 64) tokens chosen greedily, as they
 * come. It stops early at an end-of-generation token. Timings go to stderr.
 *
 * The daemon is found the way unicorn_connect(NULL, ...) finds it: $UNICORN_SOCKET, else the
 * system socket, else the user socket (start one with `unicornd --user`).
 *
 * Build it against an installed library (`make install PREFIX=$HOME/.local`):
 *
 *     cc -std=c11 -O2 generate.c -I$HOME/.local/include -L$HOME/.local/lib -lunicorn \
 *        -Wl,-rpath,$HOME/.local/lib -o generate
 *     ./generate -n 32 "The capital of France is"
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <unicorn.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL "SmolLM2-135M-Instruct.Q4_1.gguf"

/* Prints what failed with the library's message for the calling thread's last error. */
static void report(const char *what) {
    char msg[1024];
    unicorn_last_error(msg, sizeof msg);
    fprintf(stderr, "generate: %s: %s\n", what, msg);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The default model's path, in a buffer the caller frees; NULL when HOME is unset too. */
static char *default_model_path(void) {
    const char *dir = getenv("UNICORN_MODEL_DIR");
    const char *base = NULL, *suffix = "";
    if (dir != NULL && dir[0] != '\0') {
        base = dir;
    } else if ((base = getenv("XDG_CACHE_HOME")) != NULL && base[0] != '\0') {
        suffix = "/unicorn/models";
    } else if ((base = getenv("HOME")) != NULL && base[0] != '\0') {
        suffix = "/.cache/unicorn/models";
    } else {
        return NULL;
    }
    size_t len = strlen(base) + strlen(suffix) + 1 + strlen(DEFAULT_MODEL) + 1;
    char *path = malloc(len);
    if (path != NULL) snprintf(path, len, "%s%s/%s", base, suffix, DEFAULT_MODEL);
    return path;
}

/* Writes the bytes of `token` to stdout. A piece may be part of a UTF-8 character whose other
 * bytes come with the next tokens: writing bytes as they come reassembles it. */
static int write_piece(const unicorn_model *model, uint32_t token, char **buf, size_t *cap) {
    size_t n = 0;
    unicorn_status s = unicorn_token_to_piece(model, token, false, *buf, *cap, &n);
    if (s == UNICORN_ERR_BUFFER_TOO_SMALL) {
        char *bigger = realloc(*buf, n + 1);
        if (bigger == NULL) return -1;
        *buf = bigger;
        *cap = n + 1;
        s = unicorn_token_to_piece(model, token, false, *buf, *cap, &n);
    }
    if (s != UNICORN_OK) {
        report("token_to_piece");
        return -1;
    }
    fwrite(*buf, 1, n, stdout);
    fflush(stdout);
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: generate [-m MODEL] [-n N] PROMPT\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *model_arg = NULL;
    long n_predict = 64;
    int opt;
    while ((opt = getopt(argc, argv, "m:n:h")) != -1) {
        switch (opt) {
        case 'm':
            model_arg = optarg;
            break;
        case 'n': {
            char *end = NULL;
            errno = 0;
            n_predict = strtol(optarg, &end, 10);
            if (errno != 0 || end == optarg || *end != '\0' || n_predict < 0 ||
                n_predict > INT_MAX) {
                fprintf(stderr, "generate: -n wants a number of tokens, got %s\n", optarg);
                return 2;
            }
            break;
        }
        default:
            return usage();
        }
    }
    if (optind != argc - 1) return usage();
    const char *prompt = argv[optind];

    char *model_path = model_arg != NULL ? strdup(model_arg) : default_model_path();
    if (model_path == NULL) {
        fprintf(stderr, "generate: no model: set UNICORN_MODEL_DIR or HOME, or name one with -m\n");
        return 1;
    }
    if (model_arg == NULL && access(model_path, R_OK) != 0) {
        fprintf(stderr,
                "generate: the default model is not downloaded yet (%s); fetch it with "
                "scripts/fetch-model, or name one with -m\n",
                model_path);
        free(model_path);
        return 1;
    }

    int rc = 1;
    unicorn_client *client = NULL;
    unicorn_model *model = NULL;
    unicorn_context *ctx = NULL;
    uint32_t *tokens = NULL;
    size_t piece_cap = 64;
    char *piece = malloc(piece_cap);
    if (piece == NULL) goto out;

    if (unicorn_connect(NULL, &client) != UNICORN_OK) {
        report("connecting to unicornd");
        goto out;
    }

    double t0 = now_ms();
    if (unicorn_model_load(client, model_path, &model) != UNICORN_OK) {
        report(model_path);
        goto out;
    }
    double t_load = now_ms() - t0;
    unicorn_model_desc desc = {.struct_size = sizeof desc};
    if (unicorn_model_info(model, &desc) != UNICORN_OK) {
        report("model info");
        goto out;
    }
    fprintf(stderr, "generate: %s (%s, %s, %u layers, vocabulary %u) loaded in %.0f ms%s\n",
            desc.name[0] != '\0' ? desc.name : model_path, desc.arch, desc.file_type,
            desc.n_layer, desc.n_vocab, t_load, desc.shared ? " (shared)" : "");

    /* Tokenize: a guess first, then exactly what the library says is needed. add_special adds
     * BOS when the model wants it; parse_special lets the prompt hold chat-template tokens. */
    size_t prompt_len = strlen(prompt), cap = prompt_len + 2, n_prompt = 0;
    tokens = malloc(cap * sizeof *tokens);
    if (tokens == NULL) goto out;
    unicorn_status s =
        unicorn_tokenize(model, prompt, prompt_len, true, true, tokens, cap, &n_prompt);
    if (s == UNICORN_ERR_BUFFER_TOO_SMALL) {
        uint32_t *bigger = realloc(tokens, n_prompt * sizeof *tokens);
        if (bigger == NULL) goto out;
        tokens = bigger;
        cap = n_prompt;
        s = unicorn_tokenize(model, prompt, prompt_len, true, true, tokens, cap, &n_prompt);
    }
    if (s != UNICORN_OK) {
        report("tokenizing the prompt");
        goto out;
    }
    if (n_prompt == 0) {
        fprintf(stderr, "generate: the prompt has no tokens\n");
        goto out;
    }

    /* A context with the default size and greedy sampling. */
    unicorn_context_params params;
    unicorn_context_params_init(&params);
    unicorn_sampler_params_greedy(&params.sampler);
    if (unicorn_context_create(model, &params, &ctx) != UNICORN_OK) {
        report("creating a context");
        goto out;
    }
    size_t n_ctx = unicorn_context_n_ctx(ctx);
    if (n_prompt >= n_ctx) {
        fprintf(stderr, "generate: the prompt's %zu tokens do not fit the context of %zu\n",
                n_prompt, n_ctx);
        goto out;
    }
    if ((size_t)n_predict > n_ctx - n_prompt) n_predict = (long)(n_ctx - n_prompt);

    /* The prompt in one decode, which also samples the first new token. */
    fwrite(prompt, 1, prompt_len, stdout);
    fflush(stdout);
    double t1 = now_ms();
    uint32_t token = 0;
    if (n_predict > 0 && unicorn_decode_sample(ctx, tokens, n_prompt, &token) != UNICORN_OK) {
        report("decoding the prompt");
        goto out;
    }
    double t_prompt = now_ms() - t1;

    /* Then one token at a time: write it, decode it, sample the next. */
    double t2 = now_ms();
    long generated = 0;
    while (generated < n_predict) {
        if (unicorn_token_is_eog(model, token)) break;
        if (write_piece(model, token, &piece, &piece_cap) != 0) goto out;
        generated++;
        if (generated == n_predict) break;
        if (unicorn_decode_sample(ctx, &token, 1, &token) != UNICORN_OK) {
            report("decoding");
            goto out;
        }
    }
    double t_gen = now_ms() - t2;
    fputc('\n', stdout);
    fflush(stdout);

    fprintf(stderr, "generate: prompt: %zu tokens in %.1f ms (%.1f tokens/s)\n", n_prompt,
            t_prompt, t_prompt > 0 ? (double)n_prompt * 1e3 / t_prompt : 0.0);
    fprintf(stderr, "generate: generated %ld tokens in %.1f ms (%.1f tokens/s)\n", generated,
            t_gen, generated > 1 && t_gen > 0 ? (double)(generated - 1) * 1e3 / t_gen : 0.0);
    rc = 0;

out:
    /* Contexts before their model, models before their client (any order is safe). */
    unicorn_context_free(ctx);
    unicorn_model_free(model);
    unicorn_disconnect(client);
    free(tokens);
    free(piece);
    free(model_path);
    return rc;
}
