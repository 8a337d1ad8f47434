from opendit.cli import run

run()
