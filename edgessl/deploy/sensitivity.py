"""Where int8 quantisation hurts a model, measured on calibration images, and which nodes to keep in float.

The float graph is cut into blocks at the tensors through which alone everything later depends on everything
earlier (the stem's output, every residual block's output, the pooled head). For each cut tensor the relative error
of the int8 model against the float model, mean over images of ||int8 - float||^2 / ||float||^2, says how much error
the blocks up to it have added. Quantisation error accumulates block by block towards the output, and one block
kept in float on its own barely helps (its neighbours quantise the tensors it reads and writes again; MobileNetV3-
Small on emoji: the 8 blocks with the largest own error in float moved the mean cosine from 0.973 to 0.978, the
tail of the network that adds the last quarter of the error to 0.985). So the candidates keep the *tail* in float:
the blocks from the first cut whose error reaches (1 - share) of the output's error, up to the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
TAIL_SHARES = (0.125, 0.25, 0.5, 0.75)  # shares of the output's error whose tail of blocks is kept in float
IMAGES = 32  # calibration images the errors are measured on
CHUNK = 8  # images per forward pass (intermediate tensors of big inputs add up)


def quantised_nodes(int8_model) -> list[str]:
    """Names, in graph order, of the nodes of a QDQ model that read a dequantised tensor: the nodes that
    quantize_static's nodes_to_exclude can keep in float."""
    dq = {n.output[0] for n in int8_model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in int8_model.graph.node if n.op_type not in QDQ_OPS and any(i in dq for i in n.input)]


def value_names(float_model, int8_model) -> dict[str, str]:
    """Float tensor name -> the int8 model's tensor with the same value: the tensor of the same name when both
    models produce it with the same op, else its dequantised copy (the quantiser drops a Relu or Clip after a Conv
    and lets the quantisation range clip instead). Tensors without a counterpart are left out."""
    produced = {o: n.op_type for n in int8_model.graph.node for o in n.output}
    quant = {n.input[0]: n.output[0] for n in int8_model.graph.node if n.op_type == "QuantizeLinear"}
    dequant = {n.input[0]: n.output[0] for n in int8_model.graph.node if n.op_type == "DequantizeLinear"}
    names = {i.name: i.name for i in float_model.graph.input}
    for node in float_model.graph.node:
        for t in node.output:
            if produced.get(t) == node.op_type:
                names[t] = t
            elif quant.get(t) in dequant:
                names[t] = dequant[quant[t]]
    return names


def blocks(float_model, known: set[str]) -> list[tuple[list[str], str | None]]:
    """The graph (topological order) cut into blocks: (node names, the tensor it ends at). A block ends after a
    node whose output in `known` is then the only live tensor (every later node reads the past only through it);
    the last block ends at the graph output, or at None when that is not in `known`."""
    constants = {t.name for t in float_model.graph.initializer}
    nodes = list(float_model.graph.node)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for t in node.input:
            if t and t not in constants:
                last_use[t] = i
    for out in float_model.graph.output:
        last_use[out.name] = len(nodes)
    cut: list[tuple[list[str], str | None]] = []
    current: list[str] = []
    live = {i.name for i in float_model.graph.input if i.name not in constants}
    for i, node in enumerate(nodes):
        current.append(node.name)
        live = {t for t in live | set(node.output) if last_use.get(t, -1) > i}
        if len(live) == 1 and next(iter(live)) in set(node.output) & known:
            cut.append((current, next(iter(live))))
            current = []
    if current:
        cut.append((current, None))
    return cut


def _session_with_outputs(model, names: Sequence[str]):
    """An unoptimised CPU session of a copy of `model` that also outputs the tensors `names` (float32)."""
    import onnx
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                             for n in dict.fromkeys(names) if n not in present)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ as written, no fusion
    opts.log_severity_level = 3
    return ort.InferenceSession(copy.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def relative_errors(float_model, int8_model, pairs: dict[str, str], x: np.ndarray, input_name: str,
                    chunk: int = CHUNK) -> dict[str, float]:
    """{float tensor: mean over the images x of ||int8 - float||^2 / ||float||^2}, for pairs {float tensor: int8
    tensor with the same value}."""
    names = list(pairs)
    f_sess = _session_with_outputs(float_model, names)
    q_sess = _session_with_outputs(int8_model, [pairs[n] for n in names])
    sums = np.zeros(len(names))
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk]
        f_out = f_sess.run(names, {input_name: xb})
        q_out = q_sess.run([pairs[n] for n in names], {input_name: xb})
        for j, (a, b) in enumerate(zip(f_out, q_out, strict=True)):
            a = a.reshape(len(xb), -1).astype(np.float64)
            b = b.reshape(len(xb), -1).astype(np.float64)
            sums[j] += (((a - b) ** 2).sum(1) / np.maximum((a * a).sum(1), 1e-12)).sum()
    return {n: float(s / len(x)) for n, s in zip(names, sums, strict=True)}


def float_tails(cut: list[tuple[list[str], str | None]], errors: dict[str, float], quantised: Sequence[str],
                shares: Sequence[float] = TAIL_SHARES) -> list[dict[str, Any]]:
    """For each share (ascending): the quantised nodes of the blocks from the first cut whose error reaches
    (1 - share) of the output's error to the output; tails that repeat a smaller one or hold no node are skipped.
    Each: {"share", "first_block", "blocks", "nodes"}."""
    cumulative, last = [], 0.0
    for _, tensor in cut:
        last = errors.get(tensor, last) if tensor else last
        cumulative.append(last)
    total = cumulative[-1] if cumulative else 0.0
    wanted = set(quantised)
    tails, seen = [], set()
    for share in sorted(shares):
        start = next((j for j, e in enumerate(cumulative) if e >= (1 - share) * total), len(cut))
        nodes = tuple(n for names, _ in cut[start:] for n in names if n in wanted)
        if nodes and nodes not in seen:
            seen.add(nodes)
            tails.append({"share": share, "first_block": start, "blocks": len(cut) - start, "nodes": nodes})
    return tails


def sensitivity(float_path: str | Path, int8_path: str | Path, x: np.ndarray, input_name: str,
                shares: Sequence[float] = TAIL_SHARES) -> dict[str, Any]:
    """Measure the int8 model's error block by block on images x (IMAGES of them) against the float model it was
    quantised from (the prepared source, same node names); returns {"tails": float_tails(...), "record": what the
    manifest keeps}."""
    import onnx

    float_model, int8_model = onnx.load(str(float_path)), onnx.load(str(int8_path))
    pairs = value_names(float_model, int8_model)
    cut = blocks(float_model, set(pairs))
    errors = relative_errors(float_model, int8_model, {t: pairs[t] for _, t in cut if t}, x[:IMAGES], input_name)
    quantised = quantised_nodes(int8_model)
    tails = float_tails(cut, errors, quantised, shares)
    record = {
        "measured_on": Path(int8_path).name, "images": int(min(len(x), IMAGES)), "blocks": len(cut),
        "quantised_nodes": len(quantised),
        "measure": "relative squared error ||int8 - float||^2 / ||float||^2 at each block's output tensor",
        "block_errors": [{"ends_at": t, "nodes": len(names), "error": errors.get(t)} for names, t in cut],
    }
    return {"tails": tails, "record": record}
