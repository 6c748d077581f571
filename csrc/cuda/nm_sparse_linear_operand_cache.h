// Operands prepared from a (values, meta) pair for a sparse tensor-core GEMM (reordered or
// recompressed metadata), cached so that a fixed weight pays the preparation once.
//
// Why the key is safe: an entry holds weak references to both TensorImpls and remembers their
// data pointers and version counters. A hit needs the same live TensorImpl, the same data
// pointer and the same version, so a freed tensor whose memory is reused by another, an
// in-place update (optimizer step, copy_) or a .set_() all miss. Inference tensors have no
// version counter and are never cached (prepared per call). At most kMaxEntries pairs are kept
// (oldest evicted first); entries whose tensors died are dropped on the next lookup.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <deque>
#include <functional>
#include <mutex>
#include <vector>

namespace leanformer {

class SparseOperandCache {
 public:
  static constexpr size_t kMaxEntries = 64;

  // The prepared tensors for (values, meta); `prepare` runs on a miss. Pass values undefined
  // when the prepared operands depend on meta only.
  std::vector<at::Tensor> get(const at::Tensor& values, const at::Tensor& meta,
                              const std::function<std::vector<at::Tensor>()>& prepare) {
    if ((values.defined() && values.is_inference()) || meta.is_inference()) return prepare();
    const Key key = key_of(values, meta);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->key.expired()) {
          it = entries_.erase(it);
        } else if (it->key.matches(key)) {
          return it->prepared;
        } else {
          ++it;
        }
      }
    }
    std::vector<at::Tensor> prepared = prepare();
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= kMaxEntries) entries_.pop_front();
    entries_.push_back({key, prepared});
    return prepared;
  }

 private:
  struct TensorKey {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
    const c10::TensorImpl* raw = nullptr;
    const void* data = nullptr;
    int64_t version = 0;

    bool expired() const { return raw != nullptr && impl.expired(); }
    bool matches(const TensorKey& o) const {
      return raw == o.raw && data == o.data && version == o.version && (raw == nullptr || !impl.expired());
    }
  };
  struct Key {
    TensorKey values, meta;
    bool expired() const { return values.expired() || meta.expired(); }
    bool matches(const Key& o) const { return values.matches(o.values) && meta.matches(o.meta); }
  };
  struct Entry {
    Key key;
    std::vector<at::Tensor> prepared;
  };

  static TensorKey tensor_key(const at::Tensor& t) {
    if (!t.defined()) return {c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                  c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()),
                              nullptr, nullptr, 0};
    return {c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
            t.unsafeGetTensorImpl(), t.data_ptr(), t._version()};
  }
  static Key key_of(const at::Tensor& values, const at::Tensor& meta) {
    return {tensor_key(values), tensor_key(meta)};
  }

  std::mutex mutex_;
  std::deque<Entry> entries_;
};

}  // namespace leanformer
