/*
 * sched_hooks.c: link-time hooks around three ggml scheduler calls that
 * llama.cpp makes, for latent-tap's deferred capture mode.
 *
 * The build links the crate's binaries, tests and shared library with
 *   -Wl,--wrap=ggml_backend_sched_set_eval_callback
 *   -Wl,--wrap=ggml_backend_sched_alloc_graph
 *   -Wl,--wrap=ggml_backend_sched_graph_compute_async
 * so llama.cpp's calls to those functions land in the __wrap_ functions below,
 * which call the real ones (__real_, resolved by the linker) and tell the Rust
 * side before allocation (mark the selected nodes as graph outputs) and after
 * compute (copy them into the ring).
 *
 * Without those flags (a program that links the static library on its own,
 * or a Rust crate that depends on latent-tap) the __real_ symbols stay
 * undefined; they are weak, so they are NULL, lt_sched_hooks_linked() returns
 * 0 and the tap uses its callback mode. Nothing here runs unless wrapped.
 *
 * With shared llama.cpp libraries (features dynamic-link, dynamic-backends)
 * build.rs defines LT_INTERPOSE instead: see that section below.
 */
#ifdef LT_INTERPOSE
#define _GNU_SOURCE
#include <dlfcn.h>
#endif
#include <stdbool.h>
#include <stddef.h>

struct ggml_backend_sched;
struct ggml_cgraph;
struct ggml_tensor;

typedef bool (*lt_eval_cb)(struct ggml_tensor *t, bool ask, void *user_data);

/* Rust side (src/capture/deferred.rs). */
void latent_tap_hook_set_eval_callback(struct ggml_backend_sched *sched, lt_eval_cb cb,
                                       void *user_data);
void latent_tap_hook_before_alloc(struct ggml_backend_sched *sched, struct ggml_cgraph *graph);
void latent_tap_hook_after_compute(struct ggml_backend_sched *sched, struct ggml_cgraph *graph,
                                   int status);

#ifdef LT_INTERPOSE
/*
 * Shared llama.cpp (the dynamic-link / dynamic-backends features): --wrap cannot
 * reach calls between libllama.so and libggml-base.so, but ELF symbol
 * interposition can. The executable defines and exports (--export-dynamic-symbol)
 * the three functions, so libllama.so's calls bind to these, which call the next
 * definition (libggml-base.so's) through dlsym(RTLD_NEXT). Where the definitions
 * are not exported (e.g. inside liblatent_tap.so, whose exports are lt_* only),
 * libllama.so binds to libggml-base.so directly and lt_sched_hooks_linked() says 0.
 */
typedef void (*set_cb_fn)(struct ggml_backend_sched *, lt_eval_cb, void *);
typedef bool (*alloc_fn)(struct ggml_backend_sched *, struct ggml_cgraph *);
typedef int (*compute_fn)(struct ggml_backend_sched *, struct ggml_cgraph *);

static void *next_of(const char *name) { return dlsym(RTLD_NEXT, name); }

void ggml_backend_sched_set_eval_callback(struct ggml_backend_sched *sched, lt_eval_cb cb,
                                          void *user_data) {
    static set_cb_fn real;
    if (!real) real = (set_cb_fn)next_of("ggml_backend_sched_set_eval_callback");
    real(sched, cb, user_data);
    latent_tap_hook_set_eval_callback(sched, cb, user_data);
}

bool ggml_backend_sched_alloc_graph(struct ggml_backend_sched *sched, struct ggml_cgraph *graph) {
    static alloc_fn real;
    if (!real) real = (alloc_fn)next_of("ggml_backend_sched_alloc_graph");
    latent_tap_hook_before_alloc(sched, graph);
    return real(sched, graph);
}

int ggml_backend_sched_graph_compute_async(struct ggml_backend_sched *sched,
                                           struct ggml_cgraph *graph) {
    static compute_fn real;
    if (!real) real = (compute_fn)next_of("ggml_backend_sched_graph_compute_async");
    int status = real(sched, graph);
    latent_tap_hook_after_compute(sched, graph, status);
    return status;
}

int latent_tap_sched_hooks_linked(void) {
    /* Ours must be the definitions the process resolves to, and the real ones must exist. */
    return dlsym(RTLD_DEFAULT, "ggml_backend_sched_set_eval_callback") ==
               (void *)ggml_backend_sched_set_eval_callback &&
           dlsym(RTLD_DEFAULT, "ggml_backend_sched_alloc_graph") ==
               (void *)ggml_backend_sched_alloc_graph &&
           dlsym(RTLD_DEFAULT, "ggml_backend_sched_graph_compute_async") ==
               (void *)ggml_backend_sched_graph_compute_async &&
           next_of("ggml_backend_sched_set_eval_callback") != NULL &&
           next_of("ggml_backend_sched_alloc_graph") != NULL &&
           next_of("ggml_backend_sched_graph_compute_async") != NULL;
}
#else
/* enum ggml_status is an int-sized C enum. */
extern void __real_ggml_backend_sched_set_eval_callback(struct ggml_backend_sched *sched,
                                                        lt_eval_cb cb, void *user_data)
    __attribute__((weak));
extern bool __real_ggml_backend_sched_alloc_graph(struct ggml_backend_sched *sched,
                                                  struct ggml_cgraph *graph)
    __attribute__((weak));
extern int __real_ggml_backend_sched_graph_compute_async(struct ggml_backend_sched *sched,
                                                         struct ggml_cgraph *graph)
    __attribute__((weak));


int latent_tap_sched_hooks_linked(void) {
    return __real_ggml_backend_sched_set_eval_callback != NULL &&
           __real_ggml_backend_sched_alloc_graph != NULL &&
           __real_ggml_backend_sched_graph_compute_async != NULL;
}

void __wrap_ggml_backend_sched_set_eval_callback(struct ggml_backend_sched *sched, lt_eval_cb cb,
                                                 void *user_data) {
    __real_ggml_backend_sched_set_eval_callback(sched, cb, user_data);
    latent_tap_hook_set_eval_callback(sched, cb, user_data);
}

bool __wrap_ggml_backend_sched_alloc_graph(struct ggml_backend_sched *sched,
                                           struct ggml_cgraph *graph) {
    latent_tap_hook_before_alloc(sched, graph);
    return __real_ggml_backend_sched_alloc_graph(sched, graph);
}

int __wrap_ggml_backend_sched_graph_compute_async(struct ggml_backend_sched *sched,
                                                  struct ggml_cgraph *graph) {
    int status = __real_ggml_backend_sched_graph_compute_async(sched, graph);
    latent_tap_hook_after_compute(sched, graph, status);
    return status;
}
#endif
