"""The gateway's Open Inference Protocol gRPC face (issue 19): the protocol's messages
(messages.py), their conversion to and from the REST protocol's JSON (convert.py) and the
`grpc.aio` server (ingress.py) that sends each call through the same request handler as HTTP."""
