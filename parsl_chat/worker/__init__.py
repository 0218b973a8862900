"""What a Parsl worker (or the in-process backend) runs: one chunk of prompts, each asked of its
agent, checked against its schema, cached, and returned as rows."""
