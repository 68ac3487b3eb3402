from qstream.cli import main

main()
