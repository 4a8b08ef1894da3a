// dispatch_sync that hands exceptions back to the caller.
//
// libdispatch runs a block inside its own C frames: an exception that leaves the block
// terminates the process (Apple's dispatch wraps the call in a handler that aborts). The
// MPS ops encode their launches inside dispatch_sync on PyTorch's stream queue, and what
// runs there (stream->commandEncoder(), our own bookkeeping) can throw, e.g. a c10::Error
// from TORCH_CHECK. PyTorch's MPS ops use at::mps::dispatch_sync_with_rethrow for this,
// but that function is not exported from libtorch, so this is our equivalent: the block's
// exception is caught inside the block, carried out, and rethrown on the calling thread,
// where the dispatcher turns it into a Python exception.
//
// Plain C++ with blocks (no Objective-C needed): tests/test_mps_host_compile.py runs it
// on Linux with clang -fblocks. Under Objective-C++ an NSException (Metal API misuse) is
// caught as well and rethrown as std::runtime_error carrying its name and reason; a
// foreign exception would otherwise give a null std::current_exception() and vanish.
#pragma once

#include <dispatch/dispatch.h>

#include <exception>
#include <stdexcept>
#include <string>

namespace flash_quant {
namespace mps {

inline void dispatch_sync_rethrowing(dispatch_queue_t queue, void (^block)(void)) {
  __block std::exception_ptr cpp_error;
  __block std::string objc_error;
  dispatch_sync(queue, ^() {
    try {
#ifdef __OBJC__
      @try {
        block();
      } @catch (NSException* e) {
        objc_error = std::string(e.name ? e.name.UTF8String : "NSException") + ": " +
                     (e.reason ? e.reason.UTF8String : "(no reason)");
      }
#else
      block();
#endif
    } catch (...) {
      cpp_error = std::current_exception();
    }
  });
  if (cpp_error) std::rethrow_exception(cpp_error);
  if (!objc_error.empty()) throw std::runtime_error("Objective-C exception while encoding Metal work: " + objc_error);
}

}  // namespace mps
}  // namespace flash_quant
