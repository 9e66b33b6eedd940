from heed.cli import main

main()
