/* The model half of the C API against a real daemon and SmolLM2-135M-Instruct Q4_1, built with
 * -Wall -Wextra -Werror and the address and undefined-behaviour sanitizers against the installed
 * header and library.
 *
 *     model_test SOCKET MODEL
 */
#include <unicorn.h>

#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

#define REQUIRE_VOID(cond)                                                            \
    do {                                                                              \
        CHECK(cond);                                                                  \
        if (failures) return;                                                         \
    } while (0)

/* Whether the calling thread's last error message contains `needle`. */
static int last_error_has(const char *needle) {
    char msg[1024];
    unicorn_last_error(msg, sizeof msg);
    if (strstr(msg, needle) != NULL) return 1;
    fprintf(stderr, "last error \"%s\" lacks \"%s\"\n", msg, needle);
    return 0;
}

#define N_VOCAB 49152u
#define PROMPT "The capital of France is"
static const uint32_t PROMPT_IDS[] = {504, 3575, 282, 4649, 314};
#define N_PROMPT (sizeof PROMPT_IDS / sizeof PROMPT_IDS[0])
/* llama.cpp's greedy continuation of PROMPT: " Paris.\n\nThe ..." */
static const uint32_t CONTINUATION[] = {7042, 30, 198, 198, 504};
#define PARIS 7042u
#define BOS 1u
#define EOS 2u

/* Whether `n` bytes are well-formed UTF-8 on their own (no sequence cut short). */
static int utf8_complete(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t len = s[i] < 0x80 ? 1 : (s[i] >> 5) == 6 ? 2 : (s[i] >> 4) == 14 ? 3 : (s[i] >> 3) == 30 ? 4 : 0;
        if (len == 0 || i + len > n) return 0;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80) return 0;
        i += len;
    }
    return 1;
}

static size_t argmax(const float *v, size_t n) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Every new function with NULL (or otherwise unusable) arguments: errors, never crashes. */
static void null_arguments(unicorn_client *c, unicorn_model *m, unicorn_context *ctx,
                           const char *path) {
    unicorn_model *mout = NULL;
    unicorn_context *cout = NULL;
    unicorn_model_desc d = {.struct_size = sizeof d};
    unicorn_sampler_params sp;
    unicorn_context_params cp;
    uint32_t toks[8] = {0}, t = 0;
    size_t n = 0;
    char buf[64];
    float logits[4];

    unicorn_model_free(NULL);
    unicorn_context_free(NULL);
    CHECK(unicorn_model_load(NULL, path, &mout) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("client is NULL"));
    CHECK(unicorn_model_load(c, NULL, &mout) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("path is NULL"));
    CHECK(unicorn_model_load(c, path, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_model_load_fd(NULL, 0, &mout) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_model_load_fd(c, -1, &mout) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_model_load_fd(c, 0, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(mout == NULL);

    CHECK(unicorn_model_info(NULL, &d) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_model_info(m, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    d.struct_size = 0;
    CHECK(unicorn_model_info(m, &d) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("struct_size"));

    CHECK(unicorn_tokenize(NULL, "a", 1, false, false, toks, 8, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_tokenize(m, NULL, 1, false, false, toks, 8, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_tokenize(m, "a", 1, false, false, NULL, 8, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_tokenize(m, "a", 1, false, false, toks, 8, NULL) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_tokenize(m, "a\xff", 2, false, false, toks, 8, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("UTF-8"));
    CHECK(unicorn_tokenize(m, "a", (size_t)1 << 40, false, false, toks, 8, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);

    CHECK(unicorn_token_to_piece(NULL, 504, false, buf, sizeof buf, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_token_to_piece(m, 504, false, NULL, 5, &n) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_token_to_piece(m, 504, false, buf, sizeof buf, NULL) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_token_to_piece(m, N_VOCAB, false, buf, sizeof buf, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("outside the vocabulary"));
    CHECK(unicorn_detokenize(NULL, toks, 1, false, buf, sizeof buf, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_detokenize(m, NULL, 1, false, buf, sizeof buf, &n) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_detokenize(m, toks, 1, false, NULL, 3, &n) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_detokenize(m, toks, 1, false, buf, sizeof buf, NULL) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(!unicorn_token_is_eog(NULL, EOS));

    CHECK(unicorn_sampler_params_default(NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_sampler_params_greedy(NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_context_params_init(NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_context_params_init(&cp) == UNICORN_OK);
    CHECK(unicorn_context_create(NULL, &cp, &cout) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_context_create(m, &cp, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(cout == NULL);
    CHECK(unicorn_context_n_ctx(NULL) == 0);
    CHECK(unicorn_context_n_vocab(NULL) == 0);

    CHECK(unicorn_sampler_params_greedy(&sp) == UNICORN_OK);
    CHECK(unicorn_set_sampler(NULL, &sp) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_set_sampler(ctx, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_context_rewind(NULL, 0) == UNICORN_ERR_INVALID_ARGUMENT);

    CHECK(unicorn_decode(NULL, toks, 1, NULL, 0) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode(ctx, NULL, 3, NULL, 0) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode(ctx, toks, 0, NULL, 0) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode(ctx, toks, 1, logits, 4) == UNICORN_ERR_BUFFER_TOO_SMALL);
    CHECK(unicorn_decode(ctx, toks, 70000, NULL, 0) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_sample(NULL, &t) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_sample(ctx, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_sample(NULL, toks, 1, &t) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_sample(ctx, NULL, 1, &t) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_sample(ctx, toks, 1, NULL) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_async(NULL, toks, 1, true, 1) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_async(ctx, NULL, 1, true, 1) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_async(ctx, toks, 3, true, 1) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_async(ctx, toks, 0, false, 1) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_async(ctx, toks, 1, true, (uint64_t)1 << 63) ==
          UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("reserved"));

    /* Tokens outside the vocabulary are refused before anything is decoded. */
    toks[0] = N_VOCAB;
    CHECK(unicorn_decode(ctx, toks, 1, NULL, 0) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("outside the vocabulary"));
    CHECK(unicorn_decode_sample(ctx, toks, 1, &t) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_async(ctx, toks, 1, true, 1) == UNICORN_ERR_INVALID_ARGUMENT);
}

static void model_info(unicorn_model *m) {
    unicorn_model_desc d;
    memset(&d, 0xab, sizeof d);
    d.struct_size = sizeof d;
    CHECK(unicorn_model_info(m, &d) == UNICORN_OK);
    CHECK(d.struct_size == sizeof d);
    CHECK(strcmp(d.arch, "llama") == 0);
    CHECK(strcmp(d.file_type, "Q4_1") == 0);
    CHECK(d.name != NULL && d.chat_template != NULL);
    CHECK(strstr(d.chat_template, "im_start") != NULL);
    CHECK(d.digest != NULL && strlen(d.digest) == 64);
    CHECK(d.n_vocab == N_VOCAB);
    CHECK(d.n_ctx_train == 8192);
    CHECK(d.n_embd == 576 && d.n_layer == 30 && d.n_head == 9 && d.n_head_kv == 3);
    CHECK(d.n_params > 100000000 && d.n_params < 200000000);
    CHECK(d.size_bytes == 98362432);
    CHECK(d.bos == (int32_t)BOS && d.eos == (int32_t)EOS);
    CHECK(!d.add_bos);
    CHECK(!d.shared);

    /* A program built against a newer header, whose struct is longer: this version's fields are
     * filled, the rest is left alone. */
    struct {
        unicorn_model_desc d;
        unsigned char later[32];
    } newer;
    memset(&newer, 0x5a, sizeof newer);
    newer.d.struct_size = sizeof newer;
    CHECK(unicorn_model_info(m, &newer.d) == UNICORN_OK);
    CHECK(newer.d.struct_size == sizeof(unicorn_model_desc));
    CHECK(newer.d.n_vocab == N_VOCAB && strcmp(newer.d.arch, "llama") == 0);
    for (size_t i = 0; i < sizeof newer.later; i++) CHECK(newer.later[i] == 0x5a);
}

static void tokens_and_pieces(unicorn_model *m) {
    size_t n = 99;
    uint32_t ids[64];

    /* Asking for the count, a buffer too small, then the right one. */
    CHECK(unicorn_tokenize(m, PROMPT, strlen(PROMPT), true, false, NULL, 0, &n) ==
          UNICORN_ERR_BUFFER_TOO_SMALL);
    CHECK(n == N_PROMPT);
    CHECK(last_error_has("buffer too small"));
    ids[0] = 12345;
    CHECK(unicorn_tokenize(m, PROMPT, strlen(PROMPT), true, false, ids, 2, &n) ==
          UNICORN_ERR_BUFFER_TOO_SMALL);
    CHECK(n == N_PROMPT && ids[0] == 12345);
    CHECK(unicorn_tokenize(m, PROMPT, strlen(PROMPT), true, false, ids, N_PROMPT, &n) ==
          UNICORN_OK);
    CHECK(n == N_PROMPT && memcmp(ids, PROMPT_IDS, sizeof PROMPT_IDS) == 0);

    /* "Hello world" is two tokens, the same with a length that cuts a longer string. */
    const char *hw = "Hello world, and more";
    uint32_t hw_ids[4];
    CHECK(unicorn_tokenize(m, hw, 11, false, false, hw_ids, 4, &n) == UNICORN_OK);
    CHECK(n == 2 && hw_ids[0] == 19556 && hw_ids[1] == 905);
    CHECK(unicorn_tokenize(m, "", 0, true, false, NULL, 0, &n) == UNICORN_OK && n == 0);

    /* Special tokens: parsed only when asked for; their pieces only with `special`. */
    const char *chat = "<|im_start|>user\nHi<|im_end|>\n";
    CHECK(unicorn_tokenize(m, chat, strlen(chat), true, true, ids, 64, &n) == UNICORN_OK);
    CHECK(n > 3 && ids[0] == BOS && ids[n - 2] == EOS);
    CHECK(unicorn_tokenize(m, chat, strlen(chat), true, false, ids, 64, &n) == UNICORN_OK);
    CHECK(n > 3 && ids[0] != BOS);

    char buf[64];
    size_t len = 99;
    CHECK(unicorn_token_to_piece(m, BOS, false, buf, sizeof buf, &len) == UNICORN_OK);
    CHECK(len == 0 && buf[0] == '\0');
    CHECK(unicorn_token_to_piece(m, BOS, true, buf, sizeof buf, &len) == UNICORN_OK);
    CHECK(len == strlen("<|im_start|>") && strcmp(buf, "<|im_start|>") == 0);
    CHECK(unicorn_token_is_eog(m, EOS));
    CHECK(!unicorn_token_is_eog(m, PARIS));
    CHECK(!unicorn_token_is_eog(m, N_VOCAB));

    /* Pieces: too small a buffer writes nothing; an exact fit has no NUL; room adds one. */
    memset(buf, 'x', sizeof buf);
    CHECK(unicorn_token_to_piece(m, 3575, false, buf, 3, &len) ==
          UNICORN_ERR_BUFFER_TOO_SMALL);
    CHECK(len == strlen(" capital") && buf[0] == 'x');
    CHECK(unicorn_token_to_piece(m, 3575, false, buf, len, &len) == UNICORN_OK);
    CHECK(len == 8 && memcmp(buf, " capital", 8) == 0 && buf[8] == 'x');
    CHECK(unicorn_token_to_piece(m, 3575, false, buf, sizeof buf, &len) == UNICORN_OK);
    CHECK(strcmp(buf, " capital") == 0);

    /* Round trips: the pieces of a text's tokens, back to back, are the text; also for text
     * whose characters are split across tokens (partial UTF-8 pieces). */
    const char *texts[] = {PROMPT, "Unicorns 🦄 über alles, 日本語テキスト, naïve café €5.",
                           "  spaces\tand\nnewlines  "};
    for (size_t k = 0; k < sizeof texts / sizeof texts[0]; k++) {
        const char *text = texts[k];
        CHECK(unicorn_tokenize(m, text, strlen(text), false, false, ids, 64, &n) == UNICORN_OK);
        char joined[256];
        size_t at = 0, partial = 0;
        for (size_t i = 0; i < n && at < sizeof joined; i++) {
            CHECK(unicorn_token_to_piece(m, ids[i], false, joined + at, sizeof joined - at,
                                         &len) == UNICORN_OK);
            partial += !utf8_complete((const unsigned char *)joined + at, len);
            at += len;
        }
        CHECK(at == strlen(text) && memcmp(joined, text, at) == 0);
        /* The emoji and the Japanese are split into pieces that are not whole characters. */
        CHECK((k == 1) == (partial > 0));
        char whole[256];
        CHECK(unicorn_detokenize(m, ids, n, false, whole, sizeof whole, &len) == UNICORN_OK);
        CHECK(len == strlen(text) && strcmp(whole, text) == 0);
        CHECK(unicorn_detokenize(m, ids, n, false, NULL, 0, &len) ==
              UNICORN_ERR_BUFFER_TOO_SMALL);
        CHECK(len == strlen(text));
    }
}

static void context_params(unicorn_model *m) {
    unicorn_context_params p;
    memset(&p, 0xcd, sizeof p);
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    CHECK(p.struct_size == sizeof p && p.n_ctx == 0 && !p.kv_f32);
    CHECK(p.sampler.temperature == 0.8f && p.sampler.top_k == 40 && p.sampler.top_p == 0.95f);
    CHECK(p.sampler.min_p == 0.05f && p.sampler.repeat_penalty == 1.0f);
    CHECK(p.sampler.repeat_last_n == 64 && p.sampler.seed == 0);
    unicorn_sampler_params g;
    CHECK(unicorn_sampler_params_greedy(&g) == UNICORN_OK && g.temperature == 0.0f);
    unicorn_sampler_params dflt;
    CHECK(unicorn_sampler_params_default(&dflt) == UNICORN_OK);
    CHECK(memcmp(&dflt, &p.sampler, sizeof dflt) == 0);

    unicorn_context *ctx = NULL;
    /* More positions than the model was trained for. */
    p.n_ctx = 8193;
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("8192"));
    CHECK(ctx == NULL);
    /* Uninitialised parameters. */
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.struct_size = 0;
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("unicorn_context_params_init"));
    /* A bool that is neither 0 nor 1. */
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    unsigned char seven = 7;
    memcpy(&p.kv_f32, &seven, 1);
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("kv_f32"));
    /* Floats: NaN is refused here, ranges by the daemon with its message. */
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.sampler.temperature = NAN;
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("temperature"));
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.sampler.top_p = 1.5f;
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("top_p must be in (0, 1]"));
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.sampler.repeat_penalty = -1.0f;
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("repeat_penalty"));
    CHECK(ctx == NULL);

    /* Defaults (NULL parameters): the smaller of 8192 and 4096 positions. */
    CHECK(unicorn_context_create(m, NULL, &ctx) == UNICORN_OK && ctx != NULL);
    CHECK(unicorn_context_n_ctx(ctx) == 4096 && unicorn_context_n_vocab(ctx) == N_VOCAB);
    unicorn_context_free(ctx);
    /* An f32 KV cache of 256 positions. */
    ctx = NULL;
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.n_ctx = 256;
    p.kv_f32 = true;
    CHECK(unicorn_context_create(m, &p, &ctx) == UNICORN_OK && ctx != NULL);
    CHECK(unicorn_context_n_ctx(ctx) == 256);
    unicorn_context_free(ctx);
}

static void decoding(unicorn_model *m, unicorn_context *ctx) {
    uint32_t t = 0;
    float *logits = malloc(N_VOCAB * sizeof *logits);
    if (logits == NULL) abort();

    /* A fresh context has nothing to sample from; too small a logits buffer decodes nothing. */
    CHECK(unicorn_sample(ctx, &t) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("nothing to sample from"));
    CHECK(unicorn_decode(ctx, PROMPT_IDS, N_PROMPT, logits, N_VOCAB - 1) ==
          UNICORN_ERR_BUFFER_TOO_SMALL);
    CHECK(unicorn_sample(ctx, &t) == UNICORN_ERR_INVALID_ARGUMENT);

    /* Decode with logits: their argmax is the greedy sample, " Paris". */
    for (size_t i = 0; i < N_VOCAB; i++) logits[i] = NAN;
    CHECK(unicorn_decode(ctx, PROMPT_IDS, N_PROMPT, logits, N_VOCAB) == UNICORN_OK);
    size_t best = argmax(logits, N_VOCAB);
    int finite = 1;
    for (size_t i = 0; i < N_VOCAB; i++) finite &= isfinite(logits[i]) != 0;
    CHECK(finite);
    CHECK(unicorn_sample(ctx, &t) == UNICORN_OK);
    CHECK(t == best && t == PARIS);
    char piece[32];
    size_t len = 0;
    CHECK(unicorn_token_to_piece(m, t, false, piece, sizeof piece, &len) == UNICORN_OK);
    CHECK(strcmp(piece, " Paris") == 0);

    /* Greedy generation, one round trip per token. */
    uint32_t got[5] = {t};
    for (size_t i = 1; i < 5; i++)
        CHECK(unicorn_decode_sample(ctx, &got[i - 1], 1, &got[i]) == UNICORN_OK);
    CHECK(memcmp(got, CONTINUATION, sizeof got) == 0);

    /* Rewind: back to just after the prompt, the same continuation again. */
    CHECK(unicorn_context_rewind(ctx, 1000) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("rewind"));
    CHECK(unicorn_context_rewind(ctx, N_PROMPT) == UNICORN_OK);
    CHECK(unicorn_sample(ctx, &t) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(unicorn_decode_sample(ctx, &got[0], 1, &t) == UNICORN_OK && t == CONTINUATION[1]);
    CHECK(unicorn_context_rewind(ctx, 0) == UNICORN_OK);
    CHECK(unicorn_decode_sample(ctx, PROMPT_IDS, N_PROMPT, &t) == UNICORN_OK && t == PARIS);

    /* Sampler changes: a range error comes with the daemon's message; NaN is refused here. */
    unicorn_sampler_params s;
    CHECK(unicorn_sampler_params_default(&s) == UNICORN_OK);
    s.min_p = 2.0f;
    CHECK(unicorn_set_sampler(ctx, &s) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("min_p"));
    s.min_p = NAN;
    CHECK(unicorn_set_sampler(ctx, &s) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("min_p"));
    /* Random sampling with a seed draws likely tokens; greedy again gives " Paris". */
    CHECK(unicorn_sampler_params_default(&s) == UNICORN_OK);
    s.seed = 42;
    CHECK(unicorn_set_sampler(ctx, &s) == UNICORN_OK);
    CHECK(unicorn_sample(ctx, &t) == UNICORN_OK && t < N_VOCAB);
    CHECK(unicorn_sampler_params_greedy(&s) == UNICORN_OK);
    CHECK(unicorn_set_sampler(ctx, &s) == UNICORN_OK);
    CHECK(unicorn_sample(ctx, &t) == UNICORN_OK && t == PARIS);

    /* A full context: a clear status and a message that says what to do. */
    unicorn_context_params p;
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.n_ctx = 8;
    CHECK(unicorn_sampler_params_greedy(&p.sampler) == UNICORN_OK);
    unicorn_context *small = NULL;
    REQUIRE_VOID(unicorn_context_create(m, &p, &small) == UNICORN_OK);
    CHECK(unicorn_decode(small, PROMPT_IDS, N_PROMPT, NULL, 0) == UNICORN_OK);
    CHECK(unicorn_decode(small, CONTINUATION, 3, NULL, 0) == UNICORN_OK);
    CHECK(unicorn_decode_sample(small, CONTINUATION, 1, &t) == UNICORN_ERR_LIMIT_EXCEEDED);
    CHECK(last_error_has("rewind"));
    uint32_t nine[9] = {0};
    CHECK(unicorn_context_rewind(small, 0) == UNICORN_OK);
    CHECK(unicorn_decode(small, nine, 9, NULL, 0) == UNICORN_ERR_LIMIT_EXCEEDED);
    unicorn_context_free(small);
    free(logits);
}

/* Reaps one completion, polling the completion descriptor while there is none. */
static int reap_one(unicorn_client *c, unicorn_completion *done) {
    int fd = unicorn_completion_fd(c);
    CHECK(fd >= 0);
    for (;;) {
        size_t n = 0;
        CHECK(unicorn_reap(c, done, 1, &n) == UNICORN_OK);
        if (n == 1) return 1;
        /* The empty reap armed the descriptor. */
        struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
        int r = poll(&p, 1, 60000);
        CHECK(r == 1);
        if (r != 1) return 0;
    }
}

/* Generation through the rings: decodes queued with unicorn_decode_async, their completions
 * (the sampled token in `result`) reaped from a poll() loop on the completion descriptor, the
 * way an event loop would. `c` has a ring of 8 submissions. */
static void async_decoding(unicorn_client *c, unicorn_model *m, unicorn_context *ctx) {
    uint32_t t = 0;
    unicorn_completion done;
    REQUIRE_VOID(unicorn_decode_sample(ctx, PROMPT_IDS, N_PROMPT, &t) == UNICORN_OK);
    CHECK(t == PARIS);
    uint32_t got[5] = {t};
    for (size_t i = 1; i < 5; i++) {
        CHECK(unicorn_decode_async(ctx, &got[i - 1], 1, true, 100 + i) == UNICORN_OK);
        REQUIRE_VOID(reap_one(c, &done));
        CHECK(done.user_data == 100 + i && done.status == UNICORN_OK);
        got[i] = (uint32_t)done.result;
    }
    CHECK(memcmp(got, CONTINUATION, sizeof got) == 0);

    /* Two tokens without sampling, then a sample from their logits: they run in order. */
    CHECK(unicorn_context_rewind(ctx, N_PROMPT) == UNICORN_OK);
    CHECK(unicorn_decode_async(ctx, CONTINUATION, 2, false, 7) == UNICORN_OK);
    CHECK(unicorn_decode_async(ctx, NULL, 0, true, 8) == UNICORN_OK);
    REQUIRE_VOID(reap_one(c, &done));
    CHECK(done.user_data == 7 && done.status == UNICORN_OK && done.result == 0);
    REQUIRE_VOID(reap_one(c, &done));
    CHECK(done.user_data == 8 && done.status == UNICORN_OK && done.result == CONTINUATION[2]);

    /* Without reaping, the rings fill up: UNICORN_ERR_WOULD_BLOCK, then every queued decode
     * completes once reaped. */
    size_t queued = 0;
    unicorn_status s = UNICORN_OK;
    while (queued < 10000 && (s = unicorn_decode_async(ctx, NULL, 0, true, 1000 + queued)) ==
                                 UNICORN_OK)
        queued++;
    CHECK(s == UNICORN_ERR_WOULD_BLOCK);
    CHECK(last_error_has("ring is full"));
    CHECK(queued >= 8 && queued < 10000);
    for (size_t i = 0; i < queued; i++) {
        REQUIRE_VOID(reap_one(c, &done));
        CHECK(done.user_data == 1000 + i && done.status == UNICORN_OK);
        CHECK(done.result == CONTINUATION[2]);
    }

    /* A synchronous decode while an asynchronous one is pending keeps its completion for
     * unicorn_reap. */
    CHECK(unicorn_decode_async(ctx, NULL, 0, true, 9) == UNICORN_OK);
    CHECK(unicorn_decode_sample(ctx, &CONTINUATION[2], 1, &t) == UNICORN_OK);
    CHECK(t == CONTINUATION[3]);
    REQUIRE_VOID(reap_one(c, &done));
    CHECK(done.user_data == 9 && done.status == UNICORN_OK && done.result == CONTINUATION[2]);
    size_t n = 99;
    CHECK(unicorn_reap(c, &done, 1, &n) == UNICORN_OK && n == 0);

    /* A failed asynchronous decode reports its status in the completion. */
    unicorn_context_params p;
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.n_ctx = 1;
    unicorn_context *tiny = NULL;
    REQUIRE_VOID(unicorn_context_create(m, &p, &tiny) == UNICORN_OK);
    CHECK(unicorn_decode_async(tiny, CONTINUATION, 2, true, 11) == UNICORN_OK);
    REQUIRE_VOID(reap_one(c, &done));
    CHECK(done.user_data == 11 && done.status == UNICORN_ERR_LIMIT_EXCEEDED);
    unicorn_context_free(tiny);
}

/* Models and contexts keep their client alive: freeing the client first is safe, and the
 * handles keep working until they are freed too. */
static void client_freed_first(const char *sock, const char *path) {
    unicorn_client *c = NULL;
    unicorn_model *m = NULL;
    unicorn_context *ctx = NULL;
    REQUIRE_VOID(unicorn_connect(sock, &c) == UNICORN_OK);
    REQUIRE_VOID(unicorn_model_load(c, path, &m) == UNICORN_OK);
    unicorn_context_params p;
    CHECK(unicorn_context_params_init(&p) == UNICORN_OK);
    p.n_ctx = 64;
    CHECK(unicorn_sampler_params_greedy(&p.sampler) == UNICORN_OK);
    REQUIRE_VOID(unicorn_context_create(m, &p, &ctx) == UNICORN_OK);
    unicorn_disconnect(c);

    uint32_t ids[8], t = 0;
    size_t n = 0;
    CHECK(unicorn_tokenize(m, PROMPT, strlen(PROMPT), true, false, ids, 8, &n) == UNICORN_OK);
    CHECK(n == N_PROMPT);
    CHECK(unicorn_decode_sample(ctx, ids, n, &t) == UNICORN_OK && t == PARIS);
    /* The model goes before its context; the context keeps working. */
    unicorn_model_free(m);
    CHECK(unicorn_decode_sample(ctx, &t, 1, &t) == UNICORN_OK && t == CONTINUATION[1]);
    unicorn_context_free(ctx);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET MODEL\n", argv[0]);
        return 2;
    }
    const char *sock = argv[1], *path = argv[2];

    unicorn_client *c = NULL;
    REQUIRE(unicorn_connect(sock, &c) == UNICORN_OK && c != NULL);

    /* Files that are not models: errors, and no handle. */
    unicorn_model *m = NULL;
    CHECK(unicorn_model_load(c, "/nonexistent/model.gguf", &m) == UNICORN_ERR_INVALID_ARGUMENT);
    CHECK(last_error_has("/nonexistent/model.gguf"));
    int devnull = open("/dev/null", O_RDONLY);
    CHECK(devnull >= 0);
    CHECK(unicorn_model_load_fd(c, devnull, &m) != UNICORN_OK);
    close(devnull);
    CHECK(m == NULL);

    REQUIRE(unicorn_model_load(c, path, &m) == UNICORN_OK && m != NULL);
    model_info(m);
    tokens_and_pieces(m);
    context_params(m);

    unicorn_context_params p;
    REQUIRE(unicorn_context_params_init(&p) == UNICORN_OK);
    p.n_ctx = 512;
    REQUIRE(unicorn_sampler_params_greedy(&p.sampler) == UNICORN_OK);
    unicorn_context *ctx = NULL;
    REQUIRE(unicorn_context_create(m, &p, &ctx) == UNICORN_OK && ctx != NULL);
    null_arguments(c, m, ctx, path);
    decoding(m, ctx);

    /* A second session with a small ring loads the model from a descriptor: it shares the
     * model the first one loaded. */
    unicorn_connect_options o;
    REQUIRE(unicorn_connect_options_init(&o) == UNICORN_OK);
    o.socket_path = sock;
    o.sq_entries = 8;
    unicorn_client *s = NULL;
    REQUIRE(unicorn_connect_opts(&o, &s) == UNICORN_OK);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    unicorn_model *m2 = NULL;
    REQUIRE(unicorn_model_load_fd(s, fd, &m2) == UNICORN_OK && m2 != NULL);
    close(fd);
    unicorn_model_desc d1 = {.struct_size = sizeof d1}, d2 = {.struct_size = sizeof d2};
    CHECK(unicorn_model_info(m, &d1) == UNICORN_OK && unicorn_model_info(m2, &d2) == UNICORN_OK);
    CHECK(d2.shared && strcmp(d1.digest, d2.digest) == 0);
    unicorn_context *ctx2 = NULL;
    REQUIRE(unicorn_context_create(m2, &p, &ctx2) == UNICORN_OK);
    async_decoding(s, m2, ctx2);

    client_freed_first(sock, path);

    unicorn_context_free(ctx2);
    unicorn_model_free(m2);
    unicorn_disconnect(s);
    unicorn_context_free(ctx);
    unicorn_model_free(m);
    unicorn_disconnect(c);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    printf("c model test ok\n");
    return EXIT_SUCCESS;
}
