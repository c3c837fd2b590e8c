"""Drive an unmodified tritonclient (gRPC) against a server; print what it saw as JSON.

Runs in its own process: tritonclient bundles its own ``inference.*`` protobuf descriptors,
which cannot share a process with MaaS's generated ones (duplicate symbols).

Usage: python tests/triton_probe.py URL [--ssl CA.pem [--cert CERT.pem --key KEY.pem]] [--api-key KEY]
           <  [{"op": "infer", "model": ..., "inputs": {...}}, {"op": "generate", ...}, ...]
(``--ssl``: TLS with that root certificate, as tritonclient's ``ssl=True, root_certificates=...``.)
"""

from __future__ import annotations

import functools
import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def _infer(client: grpcclient.InferenceServerClient, call: dict[str, Any]) -> Any:
    inputs = []
    for name, spec in call["inputs"].items():
        array = np.array(spec["data"], dtype=spec["dtype"])
        tensor = grpcclient.InferInput(name, list(array.shape), spec.get("datatype") or np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(name) for name in call.get("outputs", [])]
    result = client.infer(
        call["model"], inputs, model_version=call.get("version", ""), outputs=outputs or None,
        client_timeout=call.get("timeout_s"), request_id=call.get("request_id", ""),
    )  # fmt: skip
    response = result.get_response(as_json=True)
    arrays = {out["name"]: result.as_numpy(out["name"]).tolist() for out in response["outputs"]}
    return {"response": response, "outputs": arrays}


def _generate(client: grpcclient.InferenceServerClient, call: dict[str, Any]) -> Any:
    """Stream one prompt to a decoupled (generative) model, as Triton's docs do; collect until the final response.

    ``{"op": "generate", "model": ..., "prompt": ..., "parameters": {...}, "empty_final": bool}``
    -> every response as ``{"text": str | None, "final": bool, "finish_reason": ...}`` or ``{"error": ...}``.
    """
    responses: queue.Queue[dict[str, Any]] = queue.Queue()

    def callback(result: Any, error: InferenceServerException | None) -> None:
        if error is not None:
            responses.put({"error": error.message()})
            return
        response = result.get_response(as_json=True)
        parameters = response.get("parameters", {})
        text = result.as_numpy("text")
        responses.put({
            "text": None if text is None else text[0].decode(),
            "final": parameters.get("triton_final_response", {}).get("bool_param", False),
            "finish_reason": parameters.get("finish_reason", {}).get("string_param"),
        })  # fmt: skip

    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([call["prompt"].encode()], dtype=np.object_))
    client.start_stream(callback=callback)
    try:
        client.async_stream_infer(
            call["model"], [prompt], request_id="gen-1", parameters=call.get("parameters"),
            enable_empty_final_response=call.get("empty_final", False),
        )  # fmt: skip
        collected = []
        while not collected or not (collected[-1].get("final") or "error" in collected[-1]):
            collected.append(responses.get(timeout=60))
    finally:
        client.stop_stream()
    return collected


_INFERENCE_OPS = {"infer": _infer, "generate": _generate}


def _run(client: grpcclient.InferenceServerClient, call: dict[str, Any]) -> Any:
    op = call["op"]
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(call["model"])
    if op == "metadata":
        return client.get_model_metadata(call["model"], as_json=True)
    if op == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if op == "config":
        return client.get_model_config(call["model"], as_json=True)
    if op == "statistics":
        return client.get_inference_statistics(call.get("model", ""), as_json=True)
    if op == "index":
        return client.get_model_repository_index(as_json=True)
    if op in _INFERENCE_OPS:
        return _INFERENCE_OPS[op](client, call)
    raise ValueError(f"unknown op {op}")


def _client(url: str, *options: str) -> grpcclient.InferenceServerClient:
    given = dict(zip(options[::2], options[1::2], strict=True))
    if "--ssl" not in given:
        return grpcclient.InferenceServerClient(url)
    return grpcclient.InferenceServerClient(
        url, ssl=True, root_certificates=given["--ssl"], certificate_chain=given.get("--cert"),
        private_key=given.get("--key"),
    )  # fmt: skip


class _Keyed:
    """A client whose every call sends ``headers`` (``--api-key KEY``: ``authorization: Bearer KEY``)."""

    def __init__(self, client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> None:
        self._client, self._headers = client, headers

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        return functools.partial(attr, headers=self._headers) if callable(attr) and name != "close" else attr


def _keyed(client: grpcclient.InferenceServerClient, *options: str) -> Any:
    given = dict(zip(options[::2], options[1::2], strict=True))
    return _Keyed(client, {"authorization": f"Bearer {given['--api-key']}"}) if "--api-key" in given else client


def main() -> None:
    client = _keyed(_client(*sys.argv[1:]), *sys.argv[2:])
    results = []
    for call in json.load(sys.stdin):
        try:
            results.append({"ok": _run(client, call)})
        except InferenceServerException as exc:
            results.append({"error": {"status": str(exc.status()), "message": exc.message()}})
    client.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
