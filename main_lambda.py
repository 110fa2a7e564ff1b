"""The attention-shrink (lambda_vit) scripts call `main_lambda.py`; it is the same trainer as main.py,
printing the final accuracy line with 2 decimals as lambda_vit's script does."""
import sys

from main import cli

if __name__ == "__main__":
    sys.exit(cli(accuracy_decimals=2))
