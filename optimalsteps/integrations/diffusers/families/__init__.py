"""One module per diffusers pipeline family; `registry.py` lists them."""
