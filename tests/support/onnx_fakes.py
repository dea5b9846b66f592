"""Small ONNX stand-ins for insightface's model packs (no real weights exist here).

Each fake has the input names/shapes and output counts that insightface's
``model_zoo.ModelRouter`` uses to classify a file, so ``FaceAnalysis`` loads
them exactly as it loads the real packs:

- detection (SCRFD, 9 outputs: score/bbox/kps for strides 8, 16, 32, 2 anchors)
- recognition (ArcFace: 112x112 input, 512 outputs; random weights)
- landmark_2d_106 / landmark_3d_68 (192x192 input), genderage (96x96 input)

The detector is not random: it "finds a face" in every bright 32x32 cell of the
stride-32 grid (score = sigmoid(10 * mean brightness - 5) with pixels in
[-1, 1]), with the box equal to that cell and five keypoints inside it. So a
test can place faces where it wants and get real boxes, keypoints and
ArcFace-aligned (norm_crop) embeddings through insightface's own code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
PACK_FILES = {
    "antelopev2": {
        "detection": "scrfd_10g_bnkps.onnx",
        "recognition": "glintr100.onnx",
        "landmark_2d_106": "2d106det.onnx",
        "landmark_3d_68": "1k3d68.onnx",
        "genderage": "genderage.onnx",
    },
    "buffalo_l": {
        "detection": "det_10g.onnx",
        "recognition": "w600k_r50.onnx",
        "landmark_2d_106": "2d106det.onnx",
        "landmark_3d_68": "1k3d68.onnx",
        "genderage": "genderage.onnx",
    },
}
# Keypoints of the fake face, as fractions of its 32 px cell (eyes, nose, mouth corners).
FAKE_KPS = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fake", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime the pack supports
    onnx.checker.check_model(model)
    return model


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def fake_detector() -> onnx.ModelProto:
    """SCRFD-shaped detector (dynamic H, W) with the bright-cell rule above."""
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    nodes, inits, outs = [], [], {"score": [], "bbox": [], "kps": []}
    widths = {"score": 1, "bbox": 4, "kps": 10}
    for stride in (8, 16, 32):
        for part, width in widths.items():
            ch = 2 * width  # two anchors per position
            w = np.zeros((ch, 3, stride, stride), np.float32)
            b = np.zeros(ch, np.float32)
            if part == "score":
                b[:] = -20.0  # strides 8 and 16 never fire
                if stride == 32:
                    w[:] = 10.0 / (3 * stride * stride)
                    b[:] = -5.0
            elif part == "bbox":
                b[:] = np.tile([0.0, 0.0, 1.0, 1.0], 2)  # box = the cell itself
            else:
                b[:] = np.tile(FAKE_KPS.reshape(-1), 2)
            name = f"{part}_{stride}"
            inits += [_const(f"{name}_w", w), _const(f"{name}_b", b)]
            inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"))
            nodes += [
                helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_c"],
                                 kernel_shape=[stride, stride], strides=[stride, stride]),
                helper.make_node("Transpose", [f"{name}_c"], [f"{name}_t"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"],
                                 [f"{name}_r" if part == "score" else name]),
            ]
            if part == "score":
                nodes.append(helper.make_node("Sigmoid", [f"{name}_r"], [name]))
            outs[part].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width]))
    outputs = outs["score"] + outs["bbox"] + outs["kps"]  # insightface's output order
    return _model(nodes, [x], outputs, inits)


def fake_head(size: int, out_dim: int, seed: int, batch="None") -> onnx.ModelProto:
    """Random-weight classifier-style head: pool -> flatten -> Gemm (size x size input)."""
    rng = np.random.default_rng(seed)
    pool = size // 7 if size % 7 == 0 else size // 8
    cells = (size // pool) ** 2 * 3
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, size, size])
    y = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, out_dim])
    inits = [_const("gemm_w", rng.standard_normal((out_dim, cells)) * 0.1),
             _const("gemm_b", np.zeros(out_dim))]
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[pool, pool],
                         strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gemm_w", "gemm_b"], ["fc1"], transB=1),
    ]
    return _model(nodes, [x], [y], inits)


def build_fake_pack(root: str | Path, name: str = "antelopev2", *, skip: tuple[str, ...] = (),
                    nested: bool = False) -> Path:
    """Write ``<root>/models/<name>/`` with fake ONNX files; returns that folder.

    ``skip`` leaves files out (incomplete download); ``nested`` reproduces the
    common ``models/antelopev2/antelopev2/*.onnx`` unzip mistake.
    """
    folder = Path(root) / "models" / name
    if nested:
        folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    builders = {
        "detection": fake_detector,
        "recognition": lambda: fake_head(112, 512, seed=0),
        "landmark_2d_106": lambda: fake_head(192, 212, seed=1, batch=1),
        "landmark_3d_68": lambda: fake_head(192, 3309, seed=2, batch=1),
        "genderage": lambda: fake_head(96, 3, seed=3, batch=1),
    }
    for task, file_name in PACK_FILES[name].items():
        if file_name not in skip:
            onnx.save(builders[task](), str(folder / file_name))
    return folder


def face_cells_image(cells: list[tuple[int, int, int]], size: int = 640) -> np.ndarray:
    """Black RGB image with bright 32x32 squares at grid cells (col, row, brightness)."""
    image = np.zeros((size, size, 3), np.uint8)
    for col, row, value in cells:
        image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] = value
    return image
