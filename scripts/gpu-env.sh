# Sourced by scripts/gpu-check.sh (and by one-off GPU commands): puts the CUDA 13 run-time
# libraries on LD_LIBRARY_PATH and sets L to the folder of libcublas.
# Run-time libraries (readelf NEEDED: libcuda.so.1 from the driver; libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 (+ libnvrtc-builtins, dlopened by
# name), libcudart.so.13). The toolkit's lib64 and PyTorch's nvidia/cu13/lib hold them.
L=$(dirname "$(find -H /usr/local/cuda* /opt $(python3 -c 'import site;print(*site.getsitepackages(),site.getusersitepackages())' 2>/dev/null) \
    -name 'libcublas.so.13*' 2>/dev/null | head -1)")
echo "CUDA libs: $L"
export LD_LIBRARY_PATH="$L${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for extra in libnvrtc-builtins.so.13.0 libcurand.so.10 libcudart.so.13; do
    [[ -e $L/$extra ]] || {
        d=$(dirname "$(find -H /usr/local/cuda* /opt $(python3 -c 'import site;print(*site.getsitepackages())' 2>/dev/null) -name "$extra*" 2>/dev/null | head -1)")
        [[ $d != . ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
    }
done
