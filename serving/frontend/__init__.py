"""Protocol in, our requests out, answers back: the first and last stage of a request.

`grpc_service.py` registers Triton's GRPCInferenceService with guarded parsing; `servicer.py`
serves its unary calls, `stream.py` ModelStreamInfer, `model_config.py` the metadata and
ModelConfig answers; `codec.py` turns v2 tensors into numpy and back; `auth.py` checks bearer
tokens; `native.py` (with `native/*.cc`) is the C++ front end that parses ModelInfer for
fixed-shape batched models itself; `protocol/` is the generated Triton protocol; `http/` serves
the same protocol over HTTP/REST (KServe v2 with Triton's extensions) through the same servicer.
"""
