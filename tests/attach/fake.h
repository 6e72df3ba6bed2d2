// What the fake libggml-base and libllama share (tests/attach): ggml's private
// graph and scheduler structs, reduced to what the fakes use.
#pragma once
#include "ggml.h"
#include "ggml-backend.h"

struct ggml_cgraph {
    int n_nodes;
    struct ggml_tensor ** nodes;
    int n_leafs;
    struct ggml_tensor ** leafs;
};

struct ggml_backend_sched {
    ggml_backend_sched_eval_callback cb;
    void * ud;
};
