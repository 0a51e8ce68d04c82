"""Run as a separate process with RANK/WORLD_SIZE set: print the keys this rank sees in each epoch as JSON."""
import json
import sys

from pipeline.data.loader import StreamingLoader

if __name__ == "__main__":
    folder, epochs, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    loader = StreamingLoader(folder, batch_size=50, resolution=8, channels=1, num_workers=workers, seed=7)
    print(json.dumps([[key for batch in loader for key in batch.keys] for _ in range(epochs)]))
