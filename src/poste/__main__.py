from poste.cli import main

main()
