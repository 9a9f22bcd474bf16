// Backward stub for a forward-only build of mamba_ssm's `selective_scan_cuda` extension.
//
// scripts/gpu_reference_bench.py compiles selective_scan.cpp and the three
// selective_scan_fwd_{fp32,fp16,bf16}.cu files of the mamba-ssm sdist, but not the six
// selective_scan_bwd_*.cu files (they take most of the build time and a benchmark of
// inference never calls them). selective_scan.cpp still references
// `selective_scan_bwd_cuda<input_t, weight_t>` from its `bwd` entry point, through its
// dispatch macros: input_t in {at::Half, at::BFloat16, float} (DISPATCH_ITYPE_...) and
// weight_t in {float, c10::complex<float>} (DISPATCH_WTYPE_FLOAT_AND_COMPLEX; the .cu files
// spell the latter `complex_t`, an alias of c10::complex<float> in selective_scan_common.h).
// This file provides those six explicit instantiations so that the extension links; each
// raises a Python RuntimeError if it is ever called.
//
// Compiled by the host compiler with the source folder on the include path (for
// selective_scan.h, which declares SSMParamsBwd).

#include <cstdint>  // uint64_t, used by selective_scan.h

#include <cuda_runtime_api.h>  // cudaStream_t

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>  // TORCH_CHECK
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include "selective_scan.h"

template <typename input_t, typename weight_t>
void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream) {
    (void)params;
    (void)stream;
    TORCH_CHECK(false,
                "selective_scan_cuda.bwd: backward not built (forward-only build made by "
                "scripts/gpu_reference_bench.py)");
}

// at::Half and at::BFloat16 are the same types as c10::Half and c10::BFloat16.
template void selective_scan_bwd_cuda<float, float>(SSMParamsBwd &params, cudaStream_t stream);
template void selective_scan_bwd_cuda<float, c10::complex<float>>(SSMParamsBwd &params,
                                                                  cudaStream_t stream);
template void selective_scan_bwd_cuda<c10::Half, float>(SSMParamsBwd &params, cudaStream_t stream);
template void selective_scan_bwd_cuda<c10::Half, c10::complex<float>>(SSMParamsBwd &params,
                                                                      cudaStream_t stream);
template void selective_scan_bwd_cuda<c10::BFloat16, float>(SSMParamsBwd &params,
                                                            cudaStream_t stream);
template void selective_scan_bwd_cuda<c10::BFloat16, c10::complex<float>>(SSMParamsBwd &params,
                                                                          cudaStream_t stream);
