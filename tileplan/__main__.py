from tileplan.cli import main

main()
