// A stand-in for libllama.so, for the LD_PRELOAD tap's tests: llama_decode
// splits the batch into ubatches of FAKE_UBATCH rows (default 4), builds a
// graph per ubatch shaped like llama.cpp's (inp_tokens / inp_pos / out_ids
// inputs, per-layer `l_out-N` nodes, the last layer pruned to the output rows)
// and computes it through the (fake) ggml scheduler. Row values are a known
// function of (layer, token, position, element), so a test can check every
// captured byte. FAKE_REORDER=1 takes the rows of a multi-sequence ubatch
// sequence-interleaved, as llama.cpp's split_equal can. FAKE_OFFLOAD=1 shapes
// the graph as ggml's scheduler leaves it when layers run on another backend
// (RPC workers, a GPU): the nodes read copies of the inputs, named
// "<backend>#<input>#0", which are filled only during the compute (so they
// hold stale values before it); the inputs themselves are the graph's leafs.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"
#include "ggml-backend.h"
#include "fake.h"

#define N_LAYER 3
#define N_EMBD 8
#define MAX_ROWS 64


static struct ggml_backend_sched g_sched;
static ggml_backend_sched_eval_callback g_host_cb;

// The host program's own eval callback (llama_context_params.cb_eval).
void fake_set_host_cb(ggml_backend_sched_eval_callback cb) {
    g_host_cb = cb;
}

float fake_value(int layer, int token, int pos, int j) {
    return (float) (layer * 10000 + token * 100 + pos) + 0.125f * (float) j;
}

static void init_tensor(struct ggml_tensor * t, const char * name, enum ggml_type type, int64_t ne0, int64_t ne1, void * data) {
    memset(t, 0, sizeof *t);
    t->type = type;
    t->buffer = (ggml_backend_buffer_t) (void *) &g_sched; // any non-null buffer: the fake's are all "host"
    t->ne[0] = ne0; t->ne[1] = ne1; t->ne[2] = 1; t->ne[3] = 1;
    size_t esz = 4;
    t->nb[0] = esz; t->nb[1] = esz * ne0; t->nb[2] = t->nb[1] * ne1; t->nb[3] = t->nb[2];
    t->data = data;
    snprintf(t->name, sizeof t->name, "%s", name);
}

static int compute_ubatch(const int * rows, int n, const struct llama_batch * b) {
    static int32_t tok[MAX_ROWS], pos[MAX_ROWS], out[MAX_ROWS];
    static float lout[N_LAYER][MAX_ROWS * N_EMBD];
    static float embd[MAX_ROWS * N_EMBD];
    static struct ggml_tensor t_tok, t_pos, t_out, t_embd, t_rope, t_l[N_LAYER];
    static struct ggml_tensor * nodes[2 + N_LAYER];
    static struct ggml_tensor * leafs[3];
    static int32_t stale[MAX_ROWS];
    static struct ggml_tensor c_pos, c_out; // the scheduler's copies (FAKE_OFFLOAD)
    int offload = getenv("FAKE_OFFLOAD") != NULL;
    int n_out = 0;
    for (int r = 0; r < n; r++) {
        int i = rows[r];
        tok[r] = b->token[i];
        pos[r] = b->pos ? b->pos[i] : r;
        if (!b->logits || b->logits[i]) {
            out[n_out++] = r;
        }
    }
    init_tensor(&t_tok, "inp_tokens", GGML_TYPE_I32, n, 1, tok);
    init_tensor(&t_pos, "inp_pos", GGML_TYPE_I32, n, 1, pos);
    init_tensor(&t_out, "out_ids", GGML_TYPE_I32, n_out, 1, out);
    init_tensor(&t_embd, "inp_embd", GGML_TYPE_F32, N_EMBD, n, embd);
    t_embd.src[1] = &t_tok;
    init_tensor(&t_rope, "Qcur-0", GGML_TYPE_F32, N_EMBD, n, embd);
    t_rope.src[1] = &t_pos;
    if (offload) {
        for (int r = 0; r < MAX_ROWS; r++) stale[r] = 1000 + r;
        init_tensor(&c_pos, "RPC0#inp_pos#0", GGML_TYPE_I32, n, 1, stale);
        init_tensor(&c_out, "RPC0#out_ids#0", GGML_TYPE_I32, n_out, 1, stale);
        t_rope.src[1] = &c_pos;
    }
    leafs[0] = &t_tok; leafs[1] = &t_pos; leafs[2] = &t_out;
    nodes[0] = &t_embd;
    nodes[1] = &t_rope;
    for (int l = 0; l < N_LAYER; l++) {
        int last = l == N_LAYER - 1;
        int m = last ? n_out : n;
        for (int r = 0; r < m; r++) {
            int src = last ? out[r] : r;
            for (int j = 0; j < N_EMBD; j++) {
                lout[l][r * N_EMBD + j] = fake_value(l, tok[src], pos[src], j);
            }
        }
        char name[32];
        snprintf(name, sizeof name, "l_out-%d", l);
        init_tensor(&t_l[l], name, GGML_TYPE_F32, N_EMBD, m, lout[l]);
        if (last) {
            t_l[l].src[1] = offload ? &c_out : &t_out;
        }
        nodes[2 + l] = &t_l[l];
    }
    struct ggml_cgraph g = { 2 + N_LAYER, nodes, 3, leafs };
    return ggml_backend_sched_graph_compute_async(&g_sched, &g) == GGML_STATUS_SUCCESS ? 0 : -3;
}

int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch) {
    (void) ctx;
    static int first = 1;
    if (first) {
        // llama.cpp sets the callback on its scheduler before the first graph.
        ggml_backend_sched_set_eval_callback(&g_sched, g_host_cb, NULL);
        first = 0;
    }
    const char * u = getenv("FAKE_UBATCH");
    int n_ubatch = u ? atoi(u) : 4;
    int reorder = getenv("FAKE_REORDER") != NULL;
    int order[MAX_ROWS * 4];
    int n = batch.n_tokens;
    if (n > MAX_ROWS * 4) return -1;
    for (int i = 0; i < n; i++) order[i] = i;
    if (reorder) {
        // Interleave sequences: one token of each in turn (split_equal-like).
        int k = 0, done[MAX_ROWS * 4] = {0};
        while (k < n) {
            int last_seq = -999;
            for (int i = 0; i < n && k < n; i++) {
                if (!done[i] && batch.seq_id[i][0] != last_seq) {
                    int seen = 0;
                    for (int j = 0; j < i; j++) if (!done[j] && batch.seq_id[j][0] == batch.seq_id[i][0]) seen = 1;
                    if (!seen) { order[k++] = i; done[i] = 1; last_seq = batch.seq_id[i][0]; }
                }
            }
        }
    }
    for (int off = 0; off < n; off += n_ubatch) {
        int m = n - off < n_ubatch ? n - off : n_ubatch;
        int r = compute_ubatch(order + off, m, &batch);
        if (r != 0) return r;
    }
    return 0;
}

bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    (void) mem; (void) seq_id; (void) p0; (void) p1;
    return true;
}

void llama_memory_clear(llama_memory_t mem, bool data) {
    (void) mem; (void) data;
}
