"""A node's model cache (the Fluid / KServe LocalModelCache role): weights named by a
service's `storageUri` are fetched once per node, kept content-addressed on the node's disk
and handed to pods read-only in `MODEL_DIR`. `policy`, `keys` and `lru` are the pure
decisions; `store` does the I/O around them."""
