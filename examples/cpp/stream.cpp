// Mode 1 through the C++ wrapper (latent_tap.hpp): same arguments and same
// output as examples/c/generate.c.
//
//   c++ -std=c++17 stream.cpp $(pkg-config --cflags --libs latent_tap) -o stream
//   ./stream model.gguf "The capital of France is" 8
#include "latent_tap.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

static double l2(lt::View<float> row) {
    double s = 0.0;
    for (float x : row) s += static_cast<double>(x) * x;
    return std::sqrt(s);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL.gguf PROMPT N_PREDICT\n", argv[0]);
        return 2;
    }
    try {
        lt::check_version();
        lt_context_params cp = lt::context_params();
        lt_capture_params cap = lt::capture_params();
        lt_sampling_params sp = lt::sampling_params();
        cp.n_ctx = 512;
        cap.patterns = "l_out-*";
        cap.rows = LT_ROWS_LAST;
        sp.n_predict = static_cast<uint32_t>(std::atoi(argv[3]));
        sp.report_top_k = 3;

        lt::Model model(argv[1], &cp);
        lt::Session session(model, &cp, &cap);
        session.submit(argv[2], &sp);
        for (;;) {
            lt::Next n = session.next(std::chrono::milliseconds(1000));
            if (n.status == lt::Poll::timeout) continue;
            if (n.status == lt::Poll::end) {
                std::fprintf(stderr, "error: stream ended without an END event\n");
                return 1;
            }
            const lt::Event &ev = n.event;
            if (ev.is_frame()) {
                const lt::Frame f = ev.frame();
                const lt::View<lt_row_meta> rows = f.rows();
                for (std::size_t r = 0; r < f.n_rows(); r++) {
                    const std::string_view name = f.name();
                    std::printf("frame name=%.*s step=%u seq=%d pos=%d l2=%.6f\n", static_cast<int>(name.size()),
                                name.data(), f.step(), rows[r].seq_id, rows[r].pos, l2(f.row_f32(r)));
                }
            } else if (ev.is_token()) {
                const lt::Token t = ev.token();
                if (t.is_prompt()) continue;
                std::printf("token step=%u seq=%d pos=%d id=%d logprob=%.6f\n", t.step(), t.seq_id(), t.pos(), t.id(),
                            static_cast<double>(t.logprob()));
            } else if (ev.is_end()) {
                const lt::End e = ev.end();
                std::printf("end frames=%llu drops=%llu\n", static_cast<unsigned long long>(e.frames),
                            static_cast<unsigned long long>(e.drops));
                if (e.status != LT_OK) {
                    std::fprintf(stderr, "error: generation: %s: %s\n", lt_status_str(e.status), lt_last_error());
                    return 1;
                }
                return 0;
            }
        }
    } catch (const lt::Error &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
