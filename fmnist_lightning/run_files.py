"""The names of what a run folder holds, in one place: the code that writes a file, the code that
reads it back and `fit --overwrite` (which removes these and nothing else) cannot disagree."""

CONFIG = "config.yaml"  # resolved settings + provenance
METRICS = "metrics.csv"  # one row per epoch
CURVES = "curves.png"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = f"{CHECKPOINT_DIR}/best.ckpt"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.ckpt"
TEST_REPORT = "report.json"
PREDICTIONS = "predictions.csv"
CONFUSION_MATRIX = "confusion_matrix.png"
CORRECT_SAMPLES = "correct.png"
INCORRECT_SAMPLES = "incorrect.png"
HTML_REPORT = "report.html"
TENSORBOARD_DIR = "tensorboard"

FIT_FILES = (CONFIG, METRICS, CURVES)  # written by `fmnist fit`, besides its checkpoints
TEST_FILES = (TEST_REPORT, PREDICTIONS, CONFUSION_MATRIX)  # written by `fmnist test`
SAMPLE_FILES = (CORRECT_SAMPLES, INCORRECT_SAMPLES)  # written by `fmnist predict-samples`
RUN_FILES = (*FIT_FILES, BEST_CHECKPOINT, LAST_CHECKPOINT, *TEST_FILES, *SAMPLE_FILES, HTML_REPORT)
RUN_FOLDERS = (TENSORBOARD_DIR,)
