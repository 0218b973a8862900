"""Model servers parsl-chat starts: the embedded one (llama-server or llama-cpp-python), one per
node under a scheduler, their supervision, and the simulated endpoint tests inject faults with."""
