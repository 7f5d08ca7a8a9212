"""Reading a control-vector file exactly as llama.cpp's `--control-vector` does, with ggml's own parser.

llama-cpp-python ships libllama and libggml but not llama.cpp's `common` library, where
`common_control_vector_load_one` lives; this is that function over the same C calls
(gguf_init_from_file, ggml_get_tensor, ggml_n_dims, ggml_nelements, ggml_get_data_f32), so a file
it accepts is a file `llama-cli --control-vector` accepts, and the buffer it returns is the one
llama.cpp hands to llama_set_adapter_cvec.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np

_GGML_TYPE_F32 = 0


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml() -> ctypes.CDLL:
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    library.gguf_init_from_file.restype = ctypes.c_void_p
    library.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    library.gguf_get_n_tensors.restype = ctypes.c_int64
    library.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    library.gguf_get_tensor_name.restype = ctypes.c_char_p
    library.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.gguf_get_tensor_type.restype = ctypes.c_int
    library.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.ggml_get_tensor.restype = ctypes.c_void_p
    library.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    library.ggml_n_dims.restype = ctypes.c_int
    library.ggml_n_dims.argtypes = [ctypes.c_void_p]
    library.ggml_nelements.restype = ctypes.c_int64
    library.ggml_nelements.argtypes = [ctypes.c_void_p]
    library.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    library.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    library.gguf_free.argtypes = [ctypes.c_void_p]
    library.ggml_free.argtypes = [ctypes.c_void_p]
    return library


class RefusedByLlamaCpp(ValueError):
    pass


def load_control_vector(path: Path, strength: float = 1.0) -> tuple[int, np.ndarray]:
    """(n_embd, buffer): the buffer starts at block 1, as llama_set_adapter_cvec expects."""
    ggml = _ggml()
    context = ctypes.c_void_p()
    gguf = ggml.gguf_init_from_file(str(path).encode(), _GGUFInitParams(False, ctypes.pointer(context)))
    if not gguf:
        raise RefusedByLlamaCpp(f"failed to load control vector file from {path}")
    try:
        n_embd, data = -1, np.zeros(0, np.float32)
        for index in range(ggml.gguf_get_n_tensors(gguf)):
            name = ggml.gguf_get_tensor_name(gguf, index).decode()
            prefix, _, number = name.partition(".")
            layer = int(number) if prefix == "direction" and number.lstrip("-").isdigit() else -1
            if layer < 0:
                raise RefusedByLlamaCpp("invalid/unparsable direction tensor layer index")
            if layer == 0:
                raise RefusedByLlamaCpp("invalid (zero) direction tensor layer index")
            tensor = ggml.ggml_get_tensor(context, name.encode())
            if ggml.gguf_get_tensor_type(gguf, index) != _GGML_TYPE_F32:
                raise RefusedByLlamaCpp("invalid (non-F32) direction tensor type")
            if ggml.ggml_n_dims(tensor) != 1:
                raise RefusedByLlamaCpp("invalid (non-1D) direction tensor shape")
            count = ggml.ggml_nelements(tensor)
            if n_embd == -1:
                n_embd = count
            elif count != n_embd:
                raise RefusedByLlamaCpp("direction tensor does not match previous dimensions")
            if data.size < n_embd * layer:
                data = np.concatenate([data, np.zeros(n_embd * layer - data.size, np.float32)])
            values = np.ctypeslib.as_array(ggml.ggml_get_data_f32(tensor), shape=(count,))
            data[n_embd * (layer - 1) : n_embd * layer] += values * strength
        return n_embd, data
    finally:
        ggml.gguf_free(gguf)
        if context:
            ggml.ggml_free(context)
