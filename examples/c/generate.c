/* Mode 1: the library runs the model.
 * Prints each generated token and, per token, every layer's L2 norm of the
 * residual stream (l_out-*) at the row that produced it.
 *
 *   cc generate.c $(pkg-config --cflags --libs latent_tap) -lm -o generate
 *   ./generate model.gguf "The capital of France is" 8
 */
#include <latent_tap.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what, lt_status st) {
    fprintf(stderr, "error: %s: %s: %s\n", what, lt_status_str(st), lt_last_error());
    return 1;
}

static double l2(const float *v, uint64_t n) {
    double s = 0.0;
    for (uint64_t i = 0; i < n; i++) s += (double)v[i] * v[i];
    return sqrt(s);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT N_PREDICT\n", argv[0]);
        return 2;
    }
    /* Every struct carries its size, so the library and the header can grow apart. */
    lt_context_params cp = {.struct_size = sizeof cp};
    lt_capture_params cap = {.struct_size = sizeof cap};
    lt_sampling_params sp = {.struct_size = sizeof sp};
    lt_context_params_default(&cp);
    lt_capture_params_default(&cap);
    lt_sampling_params_default(&sp);
    cp.n_ctx = 512;
    cap.patterns = "l_out-*";
    cap.rows = LT_ROWS_LAST;
    sp.n_predict = (uint32_t)atoi(argv[3]);
    sp.report_top_k = 3;

    lt_model *model = NULL;
    lt_session *session = NULL;
    lt_status st = lt_model_new(argv[1], &cp, &model);
    if (st != LT_OK) return fail("lt_model_new", st);
    st = lt_session_new(model, &cp, &cap, &session);
    if (st != LT_OK) {
        lt_model_free(model);
        return fail("lt_session_new", st);
    }
    st = lt_session_submit(session, argv[2], &sp);
    if (st != LT_OK) {
        lt_session_free(session);
        lt_model_free(model);
        return fail("lt_session_submit", st);
    }
    int rc = 0;
    for (;;) {
        lt_event ev = {.struct_size = sizeof ev};
        st = lt_session_next(session, 1000, &ev);
        if (st == LT_TIMEOUT) continue;
        if (st != LT_OK) {
            rc = fail("lt_session_next", st);
            break;
        }
        if (ev.kind == LT_EVENT_FRAME) {
            const lt_frame_header *f = ev.frame;
            const float *data = (const float *)ev.data;
            for (uint32_t r = 0; r < f->n_rows; r++)
                printf("frame name=%s step=%u seq=%d pos=%d l2=%.6f\n", f->name, f->step,
                       ev.rows[r].seq_id, ev.rows[r].pos, l2(data + (uint64_t)r * f->width, f->width));
        } else if (ev.kind == LT_EVENT_TOKEN) {
            const lt_token_header *t = ev.token;
            if (t->flags & LT_ROW_PROMPT) continue;
            printf("token step=%u seq=%d pos=%d id=%d logprob=%.6f\n", t->step, t->seq_id, t->pos, t->token,
                   t->logprob);
        } else if (ev.kind == LT_EVENT_END) {
            printf("end frames=%llu drops=%llu\n", (unsigned long long)ev.end_frames,
                   (unsigned long long)ev.end_drops);
            if (ev.end_status != LT_OK) {
                fprintf(stderr, "error: generation: %s: %s\n", lt_status_str(ev.end_status), ev.end_message);
                rc = 1;
            }
            break;
        }
    }
    lt_session_free(session);
    lt_model_free(model);
    return rc;
}
