"""The local DNS proxy: the NameTable the relay delivers, and (later) the server."""
