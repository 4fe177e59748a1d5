"""What the model workers (prefill, decode, colocated, elastic) share: the process that runs one."""
