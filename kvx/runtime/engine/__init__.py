"""The engine: requests in, results out, over one shared paged pool (batch_engine.py), and the model runner each prefill unit runs on."""
