// fg_fusion's autograd formula, in C++ (registered for the Autograd key, as torchvision registers its ops').
//
// The other ops register theirs from Python (torch.library.register_autograd); this one does not, because of what
// that costs here: the op's forward and backward take about 1 ms each on the bench shapes, and the Python
// autograd.Function around them (context object, pytree of the level lists, the Python backward) added ~0.45 ms
// to a training step, measured against calling the two ops directly: 25% of the fused step, more once the 17 MB
// sweeps have flushed the interpreter's data from the caches. A C++ Function adds a few microseconds and runs its
// backward without the GIL.
//
// The forward redispatches below autograd to the device kernel (or the fake kernel under torch.compile); the
// backward calls eyecool::_fg_fusion_backward through the dispatcher, so both stay visible to tracing.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace eyecool {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<std::vector<at::Tensor>, at::Tensor> fg_fusion_op(const at::Tensor& sem_logits, at::TensorList rpn_logits,
                                                             int64_t num_stuff, c10::string_view mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eyecool::fg_fusion", "")
                             .typed<std::tuple<std::vector<at::Tensor>, at::Tensor>(
                                 const at::Tensor&, at::TensorList, int64_t, c10::string_view)>();
  return op.call(sem_logits, rpn_logits, num_stuff, mode);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fg_fusion_backward_op(at::TensorList grads,
                                                                      const at::Tensor& sem_logits,
                                                                      at::TensorList rpn_logits,
                                                                      const at::Tensor& softmax_stats,
                                                                      int64_t num_stuff, c10::string_view mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eyecool::_fg_fusion_backward", "")
                             .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
                                 at::TensorList, const at::Tensor&, at::TensorList, const at::Tensor&, int64_t,
                                 c10::string_view)>();
  return op.call(grads, sem_logits, rpn_logits, softmax_stats, num_stuff, mode);
}

class FgFusionFunction : public torch::autograd::Function<FgFusionFunction> {
 public:
  // Outputs: the L fused levels, then softmax_stats (not differentiable). Inputs as the autograd engine counts
  // them: sem_logits, the L levels, num_stuff, mode.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sem_logits, at::TensorList rpn_logits,
                               int64_t num_stuff, c10::string_view mode) {
    std::vector<at::Tensor> fused;
    at::Tensor softmax_stats;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(fused, softmax_stats) = fg_fusion_op(sem_logits, rpn_logits, num_stuff, mode);
    }
    ctx->mark_non_differentiable({softmax_stats});
    // No zero-filled gradient for softmax_stats (the backward ignores it); an unused level's is made below.
    ctx->set_materialize_grads(false);
    variable_list saved{sem_logits, softmax_stats};
    saved.insert(saved.end(), rpn_logits.begin(), rpn_logits.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_stuff"] = num_stuff;
    ctx->saved_data["mode"] = std::string(mode);
    fused.push_back(softmax_stats);
    return fused;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& sem_logits = saved[0];
    const at::Tensor& softmax_stats = saved[1];
    const std::vector<at::Tensor> rpn_logits(saved.begin() + 2, saved.end());
    std::vector<at::Tensor> grads;
    for (size_t l = 0; l < rpn_logits.size(); ++l) {
      const at::Tensor& g = grad_outputs[l];
      grads.push_back(g.defined() ? g : at::zeros_like(rpn_logits[l]));
    }
    auto [grad_sem, grad_rpn] =
        fg_fusion_backward_op(grads, sem_logits, rpn_logits, softmax_stats, ctx->saved_data["num_stuff"].toInt(),
                              ctx->saved_data["mode"].toStringRef());
    variable_list grad_inputs{grad_sem};
    grad_inputs.insert(grad_inputs.end(), grad_rpn.begin(), grad_rpn.end());
    grad_inputs.emplace_back();  // num_stuff
    grad_inputs.emplace_back();  // mode
    return grad_inputs;
  }
};

// The backward op under autograd (a first derivative taken with create_graph=True): differentiable it is not, so
// a second derivative is refused instead of coming out silently wrong.
class FgFusionBackwardFunction : public torch::autograd::Function<FgFusionBackwardFunction> {
 public:
  // Outputs: grad_sem_logits, then the L levels' gradients.
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, const at::Tensor& sem_logits,
                               at::TensorList rpn_logits, const at::Tensor& softmax_stats, int64_t num_stuff,
                               c10::string_view mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_sem, grad_rpn] = fg_fusion_backward_op(grads, sem_logits, rpn_logits, softmax_stats, num_stuff, mode);
    variable_list outputs{grad_sem};
    outputs.insert(outputs.end(), grad_rpn.begin(), grad_rpn.end());
    return outputs;
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fg_fusion: double backward (a derivative of the gradient) is not supported");
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> fg_fusion_backward_autograd(at::TensorList grads,
                                                                            const at::Tensor& sem_logits,
                                                                            at::TensorList rpn_logits,
                                                                            const at::Tensor& softmax_stats,
                                                                            int64_t num_stuff,
                                                                            c10::string_view mode) {
  variable_list outputs =
      FgFusionBackwardFunction::apply(grads, sem_logits, rpn_logits, softmax_stats, num_stuff, mode);
  at::Tensor grad_sem = outputs.front();
  return {std::move(grad_sem), std::vector<at::Tensor>(outputs.begin() + 1, outputs.end())};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> fg_fusion_autograd(const at::Tensor& sem_logits,
                                                                   at::TensorList rpn_logits, int64_t num_stuff,
                                                                   c10::string_view mode) {
  variable_list outputs = FgFusionFunction::apply(sem_logits, rpn_logits, num_stuff, mode);
  at::Tensor softmax_stats = outputs.back();
  outputs.pop_back();
  return {std::move(outputs), std::move(softmax_stats)};
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, Autograd, m) {
  m.impl("fg_fusion", &eyecool::fg_fusion_autograd);
  m.impl("_fg_fusion_backward", &eyecool::fg_fusion_backward_autograd);
}
