// latent_tap.hpp: header-only C++17 RAII wrapper over the latent-tap C API
// (include/latent_tap.h), mode 1 (the library runs the model).
//
//   lt::Model model("model.gguf");
//   lt::Session session(model, &ctx_params, &capture_params);
//   session.submit("The capital of France is", &sampling_params);
//   for (;;) {
//       lt::Next n = session.next(std::chrono::seconds(1));
//       if (n.status == lt::Poll::timeout) continue;
//       if (n.status == lt::Poll::end) break;
//       ... n.event.frame() / n.event.token() / n.event.end() ...
//   }
//
// Ownership: Model and Session own their handle uniquely (move-only); a
// Session keeps its own reference to the model, so the two may be destroyed
// in any order. Events are views (no copies) into the session's ring: an
// Event and everything obtained from it stay valid only until the next
// Session::next / Session::release call or the Session's destruction.
// Errors throw lt::Error, carrying the lt_status and lt_last_error() text.
#ifndef LATENT_TAP_HPP
#define LATENT_TAP_HPP

#include <latent_tap.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace lt {

// ---------------------------------------------------------------- errors

/// A failed C API call: its status plus the thread's lt_last_error() detail.
class Error : public std::runtime_error {
public:
    Error(lt_status status, const std::string &what, const std::string &detail)
        : std::runtime_error(what + ": " + lt_status_str(status) + (detail.empty() ? "" : ": " + detail)),
          status_(status), detail_(detail) {}

    lt_status status() const noexcept { return status_; }
    /// lt_last_error() as it was when the call failed.
    const std::string &detail() const noexcept { return detail_; }

private:
    lt_status status_;
    std::string detail_;
};

/// Throw lt::Error unless `status` is LT_OK.
inline void check(lt_status status, const char *what) {
    if (status != LT_OK) throw Error(status, what, lt_last_error());
}

/// Throw if the loaded library's major ABI version differs from the header's.
inline void check_version() {
    const uint32_t v = lt_version();
    if ((v >> 16) != LT_VERSION_MAJOR)
        throw Error(LT_INVALID_ARGUMENT, "lt_version",
                    "library ABI major " + std::to_string(v >> 16) + " != header " +
                        std::to_string(LT_VERSION_MAJOR));
}

// ---------------------------------------------------------------- params

inline lt_context_params context_params() {
    lt_context_params p{};
    p.struct_size = sizeof p;
    check(lt_context_params_default(&p), "lt_context_params_default");
    return p;
}

inline lt_capture_params capture_params() {
    lt_capture_params p{};
    p.struct_size = sizeof p;
    check(lt_capture_params_default(&p), "lt_capture_params_default");
    return p;
}

inline lt_sampling_params sampling_params() {
    lt_sampling_params p{};
    p.struct_size = sizeof p;
    check(lt_sampling_params_default(&p), "lt_sampling_params_default");
    return p;
}

// ---------------------------------------------------------------- views

/// A non-owning, read-only view of `size` contiguous `T` (C++17 stand-in for std::span<const T>).
template <class T>
class View {
public:
    constexpr View() noexcept = default;
    constexpr View(const T *data, std::size_t size) noexcept : data_(data), size_(size) {}

    constexpr const T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr const T *begin() const noexcept { return data_; }
    constexpr const T *end() const noexcept { return data_ + size_; }
    constexpr const T &operator[](std::size_t i) const noexcept { return data_[i]; }
    const T &at(std::size_t i) const {
        if (i >= size_) throw std::out_of_range("lt::View::at");
        return data_[i];
    }
    /// Elements [offset, offset + count).
    View subview(std::size_t offset, std::size_t count) const {
        if (offset > size_ || count > size_ - offset) throw std::out_of_range("lt::View::subview");
        return View(data_ + offset, count);
    }

private:
    const T *data_ = nullptr;
    std::size_t size_ = 0;
};

/// A latent frame: `n_rows()` rows of `width()` elements, zero-copy.
class Frame {
public:
    explicit Frame(const lt_event &ev) noexcept : ev_(&ev) {}

    const lt_frame_header &header() const noexcept { return *ev_->frame; }
    /// Tensor name (the header's NUL-padded field, bounded even without a NUL).
    std::string_view name() const noexcept {
        const char *n = reinterpret_cast<const char *>(header().name);
        std::size_t len = 0;
        while (len < sizeof(header().name) && n[len] != '\0') len++;
        return std::string_view(n, len);
    }
    uint64_t seq() const noexcept { return header().seq; }
    uint32_t step() const noexcept { return header().step; }
    int32_t layer() const noexcept { return header().layer; }
    uint32_t dtype() const noexcept { return header().dtype; }
    std::size_t n_rows() const noexcept { return header().n_rows; }
    std::size_t width() const noexcept { return static_cast<std::size_t>(header().width); }

    /// One descriptor (seq_id, pos, token, flags) per row.
    View<lt_row_meta> rows() const noexcept { return View<lt_row_meta>(ev_->rows, n_rows()); }
    /// The raw payload bytes.
    View<unsigned char> bytes() const noexcept {
        return View<unsigned char>(static_cast<const unsigned char *>(ev_->data), ev_->data_len);
    }
    /// The whole f32 payload, row-major [n_rows][width]. Throws unless dtype is f32.
    View<float> data_f32() const {
        if (dtype() != LT_DTYPE_F32) throw Error(LT_INVALID_ARGUMENT, "lt::Frame::data_f32", "frame dtype is not f32");
        const std::size_t n = n_rows() * width();
        if (ev_->data_len < n * sizeof(float))
            throw Error(LT_INTERNAL, "lt::Frame::data_f32", "payload shorter than n_rows * width");
        return View<float>(static_cast<const float *>(ev_->data), n);
    }
    /// Row `r` as f32. Throws unless dtype is f32 or `r` is out of range.
    View<float> row_f32(std::size_t r) const {
        if (r >= n_rows()) throw std::out_of_range("lt::Frame::row_f32");
        return data_f32().subview(r * width(), width());
    }
    /// Row `r` as raw 16-bit values (f16 or bf16 frames).
    View<uint16_t> row_u16(std::size_t r) const {
        if (dtype() != LT_DTYPE_F16 && dtype() != LT_DTYPE_BF16)
            throw Error(LT_INVALID_ARGUMENT, "lt::Frame::row_u16", "frame dtype is not f16/bf16");
        if (r >= n_rows()) throw std::out_of_range("lt::Frame::row_u16");
        return View<uint16_t>(static_cast<const uint16_t *>(ev_->data) + r * width(), width());
    }

private:
    const lt_event *ev_;
};

/// A token event, zero-copy.
class Token {
public:
    explicit Token(const lt_event &ev) noexcept : ev_(&ev) {}

    const lt_token_header &header() const noexcept { return *ev_->token; }
    uint32_t step() const noexcept { return header().step; }
    int32_t seq_id() const noexcept { return header().seq_id; }
    int32_t pos() const noexcept { return header().pos; }
    int32_t id() const noexcept { return header().token; }
    bool is_prompt() const noexcept { return (header().flags & LT_ROW_PROMPT) != 0; }
    /// NaN for prompt tokens.
    float logprob() const noexcept { return header().logprob; }
    float entropy() const noexcept { return header().entropy; }
    /// Top-k alternatives, most likely first.
    View<lt_top_entry> top() const noexcept { return View<lt_top_entry>(ev_->top, header().n_top); }
    /// The token's (possibly partial UTF-8) text.
    std::string_view piece() const noexcept { return std::string_view(ev_->piece, header().piece_len); }

private:
    const lt_event *ev_;
};

/// The end of a generation.
struct End {
    uint64_t frames;
    uint64_t drops;
    lt_status status;
};

/// One event of the stream. A view: valid until the session's next next()/release().
class Event {
public:
    Event() noexcept { std::memset(&ev_, 0, sizeof ev_); }
    explicit Event(const lt_event &ev) noexcept : ev_(ev) {}

    uint32_t kind() const noexcept { return ev_.kind; }
    bool is_frame() const noexcept { return ev_.kind == LT_EVENT_FRAME; }
    bool is_token() const noexcept { return ev_.kind == LT_EVENT_TOKEN; }
    bool is_end() const noexcept { return ev_.kind == LT_EVENT_END; }

    Frame frame() const {
        if (!is_frame() || ev_.frame == nullptr) throw std::logic_error("lt::Event::frame: not a frame event");
        return Frame(ev_);
    }
    Token token() const {
        if (!is_token() || ev_.token == nullptr) throw std::logic_error("lt::Event::token: not a token event");
        return Token(ev_);
    }
    End end() const {
        if (!is_end()) throw std::logic_error("lt::Event::end: not an end event");
        return End{ev_.end_frames, ev_.end_drops, ev_.end_status};
    }
    const lt_event &raw() const noexcept { return ev_; }

private:
    lt_event ev_;  // a few pointers into the ring; the pointees are not copied
};

// ---------------------------------------------------------------- handles

/// A loaded model (unique owner of an lt_model).
class Model {
public:
    /// Load a GGUF model; `params` may be NULL (only n_gpu_layers is used).
    explicit Model(const std::string &path, const lt_context_params *params = nullptr) {
        check(lt_model_new(path.c_str(), params, &ptr_), "lt_model_new");
    }
    ~Model() { lt_model_free(ptr_); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    Model(Model &&o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
    Model &operator=(Model &&o) noexcept {
        if (this != &o) {
            lt_model_free(ptr_);
            ptr_ = std::exchange(o.ptr_, nullptr);
        }
        return *this;
    }

    struct Dims {
        uint32_t n_layer, n_embd, n_vocab;
    };
    Dims dims() const {
        Dims d{};
        check(lt_model_dims(ptr_, &d.n_layer, &d.n_embd, &d.n_vocab), "lt_model_dims");
        return d;
    }

    lt_model *get() const noexcept { return ptr_; }
    explicit operator bool() const noexcept { return ptr_ != nullptr; }

private:
    lt_model *ptr_ = nullptr;
};

/// Outcome of Session::next.
enum class Poll { event, timeout, end };

struct Next {
    Poll status;
    Event event;  // meaningful when status == Poll::event
};

/// A generation session (unique owner of an lt_session).
class Session {
public:
    /// `ctx` and `capture` may be NULL for the library's defaults.
    Session(const Model &model, const lt_context_params *ctx = nullptr, const lt_capture_params *capture = nullptr) {
        check(lt_session_new(model.get(), ctx, capture, &ptr_), "lt_session_new");
    }
    ~Session() { lt_session_free(ptr_); }
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;
    Session(Session &&o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
    Session &operator=(Session &&o) noexcept {
        if (this != &o) {
            lt_session_free(ptr_);
            ptr_ = std::exchange(o.ptr_, nullptr);
        }
        return *this;
    }

    /// Start a generation on the library's thread; read it with next().
    void submit(const std::string &prompt, const lt_sampling_params *sampling = nullptr) {
        check(lt_session_submit(ptr_, prompt.c_str(), sampling), "lt_session_submit");
    }

    /// Wait up to `timeout` for the next event. Releases the previous event
    /// (every view obtained from it dangles afterwards). Throws on errors.
    Next next(std::chrono::milliseconds timeout) {
        using rep = std::chrono::milliseconds::rep;
        const rep ms = timeout.count() < 0 ? rep(0) : timeout.count();
        const uint32_t t = ms > rep(UINT32_MAX) ? UINT32_MAX : static_cast<uint32_t>(ms);
        lt_event ev{};
        ev.struct_size = sizeof ev;
        const lt_status st = lt_session_next(ptr_, t, &ev);
        switch (st) {
        case LT_OK:
            if (ev.struct_size < sizeof(lt_event))
                throw Error(LT_INTERNAL, "lt_session_next", "lt_event.struct_size smaller than the header's");
            return Next{Poll::event, Event(ev)};
        case LT_TIMEOUT: return Next{Poll::timeout, Event()};
        case LT_END: return Next{Poll::end, Event()};
        default: throw Error(st, "lt_session_next", lt_last_error());
        }
    }

    /// Release the current event early so the ring can reuse its space.
    void release() { check(lt_session_release(ptr_), "lt_session_release"); }

    /// Ask a running generation to stop after the current step (any thread).
    void cancel() { check(lt_session_cancel(ptr_), "lt_session_cancel"); }

    /// Callback API: call `f(const Event&)` on this thread for every event up
    /// to the END event (included); `f` returns false to stop early (void is
    /// "keep going"). Exceptions thrown by `f` stop the generation and are
    /// rethrown here (they never cross the C boundary). Returns the
    /// generation's status.
    template <class F>
    lt_status generate(const std::string &prompt, const lt_sampling_params *sampling, F &&f) {
        struct Ctx {
            F *f;
            std::exception_ptr error;
        } ctx{&f, nullptr};
        auto trampoline = [](void *user, const lt_event *ev) -> int32_t {
            Ctx *c = static_cast<Ctx *>(user);
            if (c->error) return 0;
            try {
                Event e(*ev);
                if constexpr (std::is_void_v<decltype((*c->f)(e))>) {
                    (*c->f)(e);
                    return 1;
                } else {
                    return (*c->f)(e) ? 1 : 0;
                }
            } catch (...) {
                c->error = std::current_exception();
                return 0;
            }
        };
        const lt_status st = lt_session_generate(ptr_, prompt.c_str(), sampling, trampoline, &ctx);
        if (ctx.error) std::rethrow_exception(ctx.error);
        return st;
    }

    lt_session *get() const noexcept { return ptr_; }
    explicit operator bool() const noexcept { return ptr_ != nullptr; }

private:
    lt_session *ptr_ = nullptr;
};

}  // namespace lt

#endif  // LATENT_TAP_HPP
