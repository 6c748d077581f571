// The emulation build's op namespace, torch.ops.leanformer_emu: every leanformer op's schema
// under the same name, defined when this library loads (leanformer._C must be loaded first:
// leanformer.emu.load does that). Only the ops with CUDA kernels get implementations, the CUDA
// launchers compiled for the CPU (LEANFORMER_CUDA_LIBRARY_IMPL in csrc/cuda/launch.h); the
// others (packed_linear, ...) raise as they would on a GPU.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <string>

TORCH_LIBRARY(leanformer_emu, m) {
  static constexpr char kPrefix[] = "leanformer::";
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const c10::OperatorName& name : dispatcher.getAllOpNames()) {
    if (name.name.rfind(kPrefix, 0) != 0) continue;
    const auto op = dispatcher.findOp(name);
    if (!op.has_value() || !op->hasSchema()) continue;
    const std::string schema = c10::toString(op->schema());
    m.def(torch::schema(schema.substr(std::strlen(kPrefix)).c_str(), c10::AliasAnalysisKind::FROM_SCHEMA));
  }
}
