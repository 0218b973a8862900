"""What a run reads and writes: the prompts file, the ledger (the exactly-once record of every
answer), the results files written from it, chat sessions, the run directory and the response cache."""
