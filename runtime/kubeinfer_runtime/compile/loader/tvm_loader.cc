// kubeinfer-tvm-loader: run a compiled TVM (Relax VM) artifact once, outside Python.
//
// Why: a cross-compiled artifact (aarch64, armv7) cannot be loaded by the host's
// Python TVM, so the compiler verifies it by running this small program, built
// with the target's cross compiler and linked against the target's TVM runtime
// (libtvm_runtime.so, libtvm_ffi.so from the target's wheels), under qemu-user.
// It only needs the tvm-ffi headers: everything else is reached through FFI
// global functions and the module's own functions.
//
// Usage: kubeinfer-tvm-loader LIB.so OUT_DIR INPUT...
//   INPUT is FILE:DTYPE:D0,D1,...  (raw little-endian C-order bytes, e.g.
//   in0.bin:float32:1,256). Each output i is written to OUT_DIR/out<i>.bin and
//   described on stdout as "out<i> DTYPE D0,D1,...". Exit status 0 on success,
//   2 on bad arguments, 1 when loading or running fails (message on stderr).
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    t->data = std::aligned_alloc(64, ((ffi::GetDataSize(*t) + 63) / 64) * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

ffi::Tensor ReadInput(const std::string& spec) {
  std::vector<std::string> parts = Split(spec, ':');
  if (parts.size() != 3) throw std::runtime_error("input spec must be FILE:DTYPE:D0,D1,...: " + spec);
  std::vector<int64_t> shape;
  for (const std::string& d : Split(parts[2], ',')) shape.push_back(std::stoll(d));
  DLDataType dtype = ffi::StringToDLDataType(parts[1]);
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           dtype, cpu);
  size_t nbytes = ffi::GetDataSize(t);
  std::ifstream f(parts[0], std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + parts[0]);
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(f.gcount()) != nbytes) {
    throw std::runtime_error(parts[0] + " holds fewer bytes than its shape and dtype need");
  }
  return t;
}

void WriteOutput(const ffi::Tensor& t, const std::string& dir, size_t i) {
  std::string name = "out" + std::to_string(i);
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(t.data_ptr()),
          static_cast<std::streamsize>(ffi::GetDataSize(t)));
  std::cout << name << " " << ffi::DLDataTypeToString(t.dtype()) << " ";
  ffi::ShapeView shape = t.shape();
  for (size_t d = 0; d < shape.size(); ++d) std::cout << (d ? "," : "") << shape[d];
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: kubeinfer-tvm-loader LIB.so OUT_DIR FILE:DTYPE:D0,D1,... ...\n";
    return 2;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable", true).value()().cast<ffi::Module>();
    // CPU device (type 1, id 0), pooled allocator (2): what tvm.relax.VirtualMachine does.
    vm->GetFunction("vm_initialization", true).value()(1, 0, 2);
    ffi::Function main_fn = vm->GetFunction("main", true).value();
    std::vector<ffi::Tensor> inputs;
    for (int i = 3; i < argc; ++i) inputs.push_back(ReadInput(argv[i]));
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    if (auto t = result.as<ffi::Tensor>()) {
      WriteOutput(*t, argv[2], 0);
    } else if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
      for (size_t i = 0; i < arr->size(); ++i) {
        WriteOutput((*arr)[i].cast<ffi::Tensor>(), argv[2], i);
      }
    } else {
      std::cerr << "the model returned neither a tensor nor a tuple of tensors\n";
      return 1;
    }
  } catch (const std::exception& e) {
    std::cerr << "kubeinfer-tvm-loader: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
