"""The engine <-> router process boundary: gRPC over a Unix socket.

Owns: the wire format (engine.proto and its committed stubs), the conversions (codec), the engine
server (server, the only process that imports jax) and the client the router uses (client).
Must not: import anything here eagerly; `engine.rpc.client` and `engine.rpc.codec` stay jax-free.
"""
