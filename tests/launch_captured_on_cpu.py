"""``malora-train`` with the captured step's code path lifted onto the CPU (the launch's "no GPU" obstacle
removed; ``graphs.StepGraphs`` then runs its work again instead of replaying a capture): the script
``tests/test_train_distributed.py`` launches as two processes to check the multi-process captured step."""

from malora_train.cli import train_main
from malora_train.train import step_path

step_path.launch_obstacle = lambda *launch: None

if __name__ == "__main__":
    train_main()
