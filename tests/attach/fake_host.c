// An "unmodified llama.cpp program" for the LD_PRELOAD tap's tests, linked
// against the fake libllama/libggml-base: like llama-server, it clears a
// sequence before each request, evaluates two prompts in one batch, then
// decodes greedily one token per sequence per step. It prints a checksum of
// everything its own eval callback saw (FAKE_HOST_CB=1), which must not
// change under the tap.
//   fake_host STEPS SLEEP_MS
// Built with -DFAKE_DLOPEN=\"DIR/libllama.so\" (fake_host_dl), it is not
// linked against libllama/libggml-base: it loads them after start-up with
// dlopen(RTLD_NOW | RTLD_LOCAL) and calls them through dlsym'ed pointers, as
// Python's ctypes does for llama-cpp-python.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "llama.h"
#include "ggml-backend.h"

static double g_sum;
static long g_calls;

static bool host_cb(struct ggml_tensor * t, bool ask, void * ud) {
    (void) ud;
    if (ask) {
        return strcmp(t->name, "l_out-1") == 0;
    }
    g_calls++;
    const float * x = (const float *) t->data;
    for (int64_t i = 0; i < t->ne[0] * t->ne[1]; i++) g_sum += x[i];
    return true;
}

#ifdef FAKE_DLOPEN
#include <dlfcn.h>
static void (*p_set_host_cb)(ggml_backend_sched_eval_callback);
static bool (*p_seq_rm)(llama_memory_t, llama_seq_id, llama_pos, llama_pos);
static int32_t (*p_decode)(struct llama_context *, struct llama_batch);
#define fake_set_host_cb p_set_host_cb
#define llama_memory_seq_rm p_seq_rm
#define llama_decode p_decode

static int load_llama(void) {
    void * h = dlopen(FAKE_DLOPEN, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 0; }
    *(void **) &p_set_host_cb = dlsym(h, "fake_set_host_cb");
    *(void **) &p_seq_rm = dlsym(h, "llama_memory_seq_rm");
    *(void **) &p_decode = dlsym(h, "llama_decode");
    if (!p_set_host_cb || !p_seq_rm || !p_decode) { fprintf(stderr, "dlsym: %s\n", dlerror()); return 0; }
    return 1;
}
#else
void fake_set_host_cb(ggml_backend_sched_eval_callback cb);
static int load_llama(void) { return 1; }
#endif

int main(int argc, char ** argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 6;
    int sleep_ms = argc > 2 ? atoi(argv[2]) : 0;
    if (!load_llama()) return 1;
    if (getenv("FAKE_HOST_CB")) {
        // Reach the fake scheduler the way llama.cpp's context would: the fake
        // llama sets NULL first; the host's own callback goes on top.
        fake_set_host_cb(host_cb);
    }
    int32_t tok[16], pos[16], nseq[16];
    int8_t logits[16];
    llama_seq_id sid[16], *sids[16];
    for (int i = 0; i < 16; i++) sids[i] = &sid[i];
    // Request 1 on seq 0 (6 tokens) and request 2 on seq 1 (7 tokens).
    llama_memory_seq_rm(NULL, 0, 0, -1);
    llama_memory_seq_rm(NULL, 1, 0, -1);
    int n = 0;
    for (int i = 0; i < 6; i++) { tok[n] = 10 + i; pos[n] = i; sid[n] = 0; logits[n] = i == 5; n++; }
    // FAKE_SAME=1: both prompts start alike (as with a shared system prompt).
    int base1 = getenv("FAKE_SAME") ? 10 : 50;
    for (int i = 0; i < 7; i++) { tok[n] = base1 + i; pos[n] = i; sid[n] = 1; logits[n] = i == 6; n++; }
    for (int i = 0; i < n; i++) nseq[i] = 1;
    struct llama_batch b = { n, tok, NULL, pos, nseq, sids, logits };
    if (llama_decode(NULL, b) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    int last[2] = { 20, 60 }, p[2] = { 6, 7 };
    for (int s = 0; s < steps; s++) {
        if (sleep_ms) usleep(sleep_ms * 1000);
        n = 0;
        for (int q = 0; q < 2; q++) {
            // The "sampled" token: a function of the previous one.
            tok[n] = last[q] + 1; pos[n] = p[q]; sid[n] = q; logits[n] = 1; n++;
            last[q] = tok[n - 1]; p[q]++;
        }
        b.n_tokens = n;
        if (llama_decode(NULL, b) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    }
    printf("host done: steps %d, callback calls %ld, sum %.3f\n", steps, g_calls, g_sum);
    return 0;
}
