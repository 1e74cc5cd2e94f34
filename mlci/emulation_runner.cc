// mlci's runner for exported Relax libraries on another architecture (mlci/emulation.py).
//
// Cross-compiled for the target (e.g. aarch64-linux-gnu-g++), linked to that architecture's
// libtvm_ffi.so and libtvm_runtime.so, and started under user-mode emulation (qemu-aarch64):
// no Python is needed on the target side. One process runs every call of every library listed
// in the request, because starting qemu and loading the runtime is the slow part.
//
// It computes outputs only: nothing here is timed (emulated time says nothing about the target).
//
// Usage: emulation_runner REQUEST RESPONSE
// REQUEST, one item a line, tokens separated by spaces; a path is the rest of its line:
//   model LIBRARY
//   call N                       the next N `tensor` lines are the inputs of one call of `main`
//   tensor DTYPE NDIM DIM... FILE   raw C-order bytes
// RESPONSE, written as the calls finish (a crash leaves the model it was on begun and not ended):
//   begin MODEL
//   output MODEL CALL INDEX DTYPE NDIM DIM... FILE
//   error MODEL MESSAGE          this model failed (loading, or a call); the runner goes on with the next
//   end MODEL
//   done
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

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

constexpr size_t kAlignment = 64;  // what TVM's kernels assume of their arguments' data
constexpr int kCPU = 1;            // kDLCPU
constexpr int kPooledAllocator = 2;

struct AlignedAlloc {
  void AllocData(DLTensor* tensor) {
    size_t size = ffi::GetDataSize(*tensor);
    size_t rounded = (size + kAlignment - 1) / kAlignment * kAlignment;
    tensor->data = std::aligned_alloc(kAlignment, rounded == 0 ? kAlignment : rounded);
    if (tensor->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct TensorLine {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string file;
};

struct Call {
  std::vector<TensorLine> inputs;
};

struct ModelRequest {
  std::string library;
  std::vector<Call> calls;
};

std::string RestOfLine(std::istringstream& tokens) {
  std::string rest;
  std::getline(tokens >> std::ws, rest);
  return rest;
}

std::vector<ModelRequest> ReadRequest(const char* path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(std::string("cannot read the request ") + path);
  std::vector<ModelRequest> models;
  std::string line;
  size_t pending = 0;
  while (std::getline(in, line)) {
    std::istringstream tokens(line);
    std::string kind;
    if (!(tokens >> kind)) continue;
    if (kind == "model") {
      models.emplace_back();
      models.back().library = RestOfLine(tokens);
    } else if (kind == "call") {
      if (models.empty()) throw std::runtime_error("request: `call` before `model`");
      tokens >> pending;
      models.back().calls.emplace_back();
    } else if (kind == "tensor") {
      if (models.empty() || models.back().calls.empty() || pending == 0) {
        throw std::runtime_error("request: `tensor` outside a call");
      }
      TensorLine tensor;
      size_t ndim = 0;
      tokens >> tensor.dtype >> ndim;
      tensor.shape.resize(ndim);
      for (auto& dim : tensor.shape) tokens >> dim;
      if (!tokens) throw std::runtime_error("request: bad tensor line: " + line);
      tensor.file = RestOfLine(tokens);
      if (tensor.file.empty()) throw std::runtime_error("request: bad tensor line: " + line);
      models.back().calls.back().inputs.push_back(tensor);
      --pending;
    } else {
      throw std::runtime_error("request: unknown line: " + line);
    }
  }
  return models;
}

ffi::Tensor ReadTensor(const TensorLine& line) {
  DLDataType dtype = ffi::StringToDLDataType(line.dtype);
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(line.shape.data(), line.shape.size()),
                                                dtype, DLDevice{kDLCPU, 0});
  size_t size = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  std::ifstream in(line.file, std::ios::binary);
  if (!in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(size))) {
    throw std::runtime_error("cannot read " + std::to_string(size) + " bytes from " + line.file);
  }
  return tensor;
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) Flatten(item, out);
  } else {
    throw std::runtime_error("main returned a value that is neither a tensor nor a tuple: " + value.GetTypeKey());
  }
}

std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

void RunModel(size_t index, const ModelRequest& request, const std::string& out_dir, std::ofstream& response) {
  ffi::Module library = ffi::Module::LoadFromFile(request.library);
  ffi::Function load = library->GetFunction("vm_load_executable", true).value();
  ffi::Module vm = load().cast<ffi::Module>();
  vm->GetFunction("vm_initialization", true).value()(kCPU, 0, kPooledAllocator);
  ffi::Function main = vm->GetFunction("main", true).value();
  for (size_t call = 0; call < request.calls.size(); ++call) {
    std::vector<ffi::Tensor> inputs;
    for (const TensorLine& line : request.calls[call].inputs) inputs.push_back(ReadTensor(line));
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    main.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs);
    for (size_t k = 0; k < outputs.size(); ++k) {
      const ffi::Tensor& tensor = outputs[k];
      if (!tensor.IsContiguous()) throw std::runtime_error("output " + std::to_string(k) + " is not contiguous");
      std::string file = out_dir + "/out_" + std::to_string(index) + "_" + std::to_string(call) + "_" + std::to_string(k) + ".bin";
      std::ofstream out(file, std::ios::binary);
      const char* data = static_cast<const char*>(tensor.data_ptr()) + tensor.GetDLTensorPtr()->byte_offset;
      out.write(data, static_cast<std::streamsize>(ffi::GetDataSize(*tensor.GetDLTensorPtr())));
      if (!out) throw std::runtime_error("cannot write " + file);
      response << "output " << index << " " << call << " " << k << " " << ffi::DLDataTypeToString(tensor.dtype()) << " "
               << tensor.ndim();
      for (int64_t dim : tensor.shape()) response << " " << dim;
      response << " " << file << "\n";
    }
    response.flush();
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " REQUEST RESPONSE\n";
    return 2;
  }
  std::vector<ModelRequest> models;
  try {
    models = ReadRequest(argv[1]);
  } catch (const std::exception& exc) {
    std::cerr << exc.what() << "\n";
    return 2;
  }
  std::string response_path = argv[2];
  std::string out_dir = response_path.substr(0, response_path.find_last_of('/'));
  if (response_path.find('/') == std::string::npos) out_dir = ".";
  std::ofstream response(response_path);
  for (size_t i = 0; i < models.size(); ++i) {
    response << "begin " << i << "\n";
    response.flush();
    try {
      RunModel(i, models[i], out_dir, response);
    } catch (const std::exception& exc) {
      response << "error " << i << " " << OneLine(exc.what()) << "\n";
    }
    response << "end " << i << "\n";
    response.flush();
  }
  response << "done\n";
  return response ? 0 : 1;
}
