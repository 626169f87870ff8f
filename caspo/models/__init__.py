"""Model backends behind one interface: hf (transformers), vllm (GPU); the built-in tiny reasoner."""
