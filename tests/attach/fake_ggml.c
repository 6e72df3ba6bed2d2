// A stand-in for libggml-base.so, for the LD_PRELOAD tap's tests: the few
// functions the tap interposes or calls, with the real ggml.h prototypes and
// struct ggml_tensor (compiled against the vendored headers). Nodes are
// "computed" in order and the scheduler's eval callback is called the way
// ggml_backend_sched_compute_splits calls it: ask for each node, and hand over
// the data of the ones asked for.
// -DOMIT_GRAPH_NODE leaves ggml_graph_node out (a host the tap cannot serve).
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-backend.h"
#include "fake.h"


void ggml_backend_sched_set_eval_callback(ggml_backend_sched_t sched, ggml_backend_sched_eval_callback cb, void * ud) {
    sched->cb = cb;
    sched->ud = ud;
}

enum ggml_status ggml_backend_sched_graph_compute_async(ggml_backend_sched_t sched, struct ggml_cgraph * g) {
    // The fake llama filled every node's data already: "compute" is the walk.
    for (int i = 0; i < g->n_nodes; i++) {
        struct ggml_tensor * t = g->nodes[i];
        if (sched->cb && sched->cb(t, true, sched->ud)) {
            if (!sched->cb(t, false, sched->ud)) {
                break;
            }
        }
    }
    return GGML_STATUS_SUCCESS;
}

enum ggml_status ggml_backend_sched_graph_compute(ggml_backend_sched_t sched, struct ggml_cgraph * g) {
    return ggml_backend_sched_graph_compute_async(sched, g);
}

void ggml_backend_tensor_get(const struct ggml_tensor * t, void * data, size_t offset, size_t size) {
    memcpy(data, (const char *) t->data + offset, size);
}

bool ggml_backend_buffer_is_host(ggml_backend_buffer_t buf) {
    (void) buf;
    return true;
}

int ggml_graph_n_nodes(struct ggml_cgraph * g) {
    return g->n_nodes;
}

#ifndef OMIT_GRAPH_NODE
struct ggml_tensor * ggml_graph_node(struct ggml_cgraph * g, int i) {
    return g->nodes[i < 0 ? g->n_nodes + i : i];
}
#endif

// As ggml: the graph's leafs (inputs), then its nodes, by name.
struct ggml_tensor * ggml_graph_get_tensor(const struct ggml_cgraph * g, const char * name) {
    for (int i = 0; i < g->n_leafs; i++) {
        if (strcmp(g->leafs[i]->name, name) == 0) return g->leafs[i];
    }
    for (int i = 0; i < g->n_nodes; i++) {
        if (strcmp(g->nodes[i]->name, name) == 0) return g->nodes[i];
    }
    return NULL;
}

size_t ggml_tensor_overhead(void) {
    return sizeof(struct ggml_tensor) + 32;
}

int64_t ggml_nelements(const struct ggml_tensor * t) {
    return t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
}

const char * ggml_get_name(const struct ggml_tensor * t) {
    return t->name;
}
