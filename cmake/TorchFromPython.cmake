# Imported torch target built from the installed torch's own paths.
#
# Why not find_package(Torch): Caffe2Config.cmake stops with "Your installed Caffe2 version uses CUDA but I
# cannot find the CUDA libraries" whenever a CUDA torch wheel meets a machine without a usable toolkit
# (pytorch#73427). Asking torch.utils.cpp_extension works with either wheel, with or without nvcc.
#
# Sets: TORCH_VERSION, TORCH_CUDA_VERSION ("" for a CPU wheel), target bnbx_torch (INTERFACE).

if(NOT Python_EXECUTABLE)
  find_package(Python 3.9 REQUIRED COMPONENTS Interpreter)
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
"import torch, torch.utils.cpp_extension as ce
print(torch.__version__)
print(torch.version.cuda or '')
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print('|'.join(ce.include_paths()))
print('|'.join(ce.library_paths()))"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  ERROR_VARIABLE _torch_err)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "bnbx: could not import torch with ${Python_EXECUTABLE}: ${_torch_err}\n"
                      "Install torch first, then build with: pip install --no-build-isolation .")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_VERSION)
list(GET _torch_info 1 TORCH_CUDA_VERSION)
list(GET _torch_info 2 _torch_cxx11_abi)
list(GET _torch_info 3 _torch_includes)
list(GET _torch_info 4 _torch_libdirs)
string(REPLACE "|" ";" _torch_includes "${_torch_includes}")
string(REPLACE "|" ";" _torch_libdirs "${_torch_libdirs}")
message(STATUS "bnbx: torch ${TORCH_VERSION}, CUDA '${TORCH_CUDA_VERSION}', CXX11 ABI ${_torch_cxx11_abi}")

add_library(bnbx_torch INTERFACE)
target_include_directories(bnbx_torch SYSTEM INTERFACE ${_torch_includes})
target_compile_definitions(bnbx_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi})
foreach(_lib c10 torch_cpu)
  find_library(_path_${_lib} NAMES ${_lib} PATHS ${_torch_libdirs} NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(bnbx_torch INTERFACE ${_path_${_lib}})
endforeach()

# Adds the CUDA half of torch; called only when bnbx builds CUDA kernels.
function(bnbx_torch_add_cuda)
  foreach(_lib c10_cuda torch_cuda)
    find_library(_path_${_lib} NAMES ${_lib} PATHS ${_torch_libdirs} NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(bnbx_torch INTERFACE ${_path_${_lib}})
  endforeach()
endfunction()
