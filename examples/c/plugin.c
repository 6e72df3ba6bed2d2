/* Mode 2: an app that drives llama.cpp itself adds a tap with three calls:
 * lt_tap_new (from a spec), lt_tap_attach (into its llama_context_params) and
 * lt_tap_begin_batch (before each llama_decode). It prints the same lines as
 * generate.c. Link the static library, which carries the one llama.cpp that
 * both the app and the tap use:
 *
 *   cc plugin.c $(pkg-config --cflags --libs latent_tap-static) -o plugin
 *   ./plugin model.gguf "The capital of France is" 8
 */
#include <llama.h>
#include <latent_tap.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)level;
    (void)text;
    (void)user;
}

static double l2(const float *v, uint64_t n) {
    double s = 0.0;
    for (uint64_t i = 0; i < n; i++) s += (double)v[i] * v[i];
    return sqrt(s);
}

/* Print every event the tap has so far (frames of the last decode, tokens pushed). */
static int drain(lt_tap *tap) {
    lt_event ev = {.struct_size = sizeof ev};
    lt_status st;
    while ((st = lt_tap_next(tap, 0, &ev)) == LT_OK) {
        if (ev.kind == LT_EVENT_FRAME) {
            const lt_frame_header *f = ev.frame;
            const float *data = (const float *)ev.data;
            for (uint32_t r = 0; r < f->n_rows; r++)
                printf("frame name=%s step=%u seq=%d pos=%d l2=%.6f\n", f->name, f->step, ev.rows[r].seq_id,
                       ev.rows[r].pos, l2(data + (uint64_t)r * f->width, f->width));
        } else if (ev.kind == LT_EVENT_TOKEN) {
            const lt_token_header *t = ev.token;
            printf("token step=%u seq=%d pos=%d id=%d logprob=%.6f\n", t->step, t->seq_id, t->pos, t->token,
                   t->logprob);
        }
    }
    return st == LT_TIMEOUT ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT N_PREDICT\n", argv[0]);
        return 2;
    }
    int n_predict = atoi(argv[3]);
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "error: cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 512;
    cparams.n_threads = cparams.n_threads_batch = 2;

    /* 1. a tap from a capture spec */
    lt_capture_params cap = {.struct_size = sizeof cap};
    lt_capture_params_default(&cap);
    cap.patterns = "l_out-*";
    cap.rows = LT_ROWS_LAST;
    lt_tap *tap = NULL;
    lt_status st = lt_tap_new(model, &cap, cparams.n_ubatch, &tap);
    if (st != LT_OK) {
        fprintf(stderr, "error: lt_tap_new: %s: %s\n", lt_status_str(st), lt_last_error());
        llama_model_free(model);
        return 1;
    }
    /* deferred (no graph split) when this program was linked with the wrap flags
       of `pkg-config --libs latent_tap-static`, else callback */
    uint32_t mode = 0;
    lt_tap_capture_mode(tap, &mode);
    fprintf(stderr, "capture mode: %s\n", mode == 2 ? "deferred" : "callback");
    /* 2. attach it to the context parameters */
    lt_tap_attach(tap, &cparams);
    struct llama_context *ctx = llama_init_from_model(model, cparams);
    const struct llama_vocab *vocab = llama_model_get_vocab(model);

    int n_prompt = -llama_tokenize(vocab, argv[2], (int)strlen(argv[2]), NULL, 0, true, false);
    llama_token *prompt = malloc(sizeof(llama_token) * (size_t)n_prompt);
    llama_tokenize(vocab, argv[2], (int)strlen(argv[2]), prompt, n_prompt, true, false);
    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    struct llama_batch batch = llama_batch_get_one(prompt, n_prompt);
    llama_pos positions[1];
    llama_pos *pos_buf = malloc(sizeof(llama_pos) * (size_t)n_prompt);
    for (int i = 0; i < n_prompt; i++) pos_buf[i] = i;
    batch.pos = pos_buf; /* the tap needs positions; llama_batch_get_one leaves them NULL */
    int rc = 0;
    llama_token tok = 0;
    for (int step = 0; step < n_predict; step++) {
        /* 3. tell the tap what this decode computes */
        if (lt_tap_begin_batch(tap, ctx, &batch, (uint32_t)step) != LT_OK || llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "error: decode failed: %s\n", lt_last_error());
            rc = 1;
            break;
        }
        int pos = step == 0 ? n_prompt : n_prompt + step;
        tok = llama_sampler_sample(smpl, ctx, -1);
        /* optional: put the sampled token (logprob, top-k) into the same stream */
        lt_tap_push_token(tap, ctx, -1 + batch.n_tokens, tok, 0, pos, (uint32_t)step, 3);
        if (drain(tap)) {
            rc = 1;
            break;
        }
        if (llama_vocab_is_eog(vocab, tok)) break;
        positions[0] = pos;
        batch = llama_batch_get_one(&tok, 1);
        batch.pos = positions;
    }
    llama_sampler_free(smpl);
    llama_free(ctx);
    lt_tap_free(tap); /* after llama_free: the context calls into the tap */
    llama_model_free(model);
    free(prompt);
    free(pos_buf);
    return rc;
}
